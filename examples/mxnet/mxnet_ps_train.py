#!/usr/bin/env python3
"""A small, real data-parallel training job on MXNet's parameter server (kvstore dist_sync).

Used by geomx's examples/mxnet-ps.toml and baked into the image that
scripts/build-mxnet-image.sh builds (at /opt/geomx/examples/mxnet_ps_train.py).

The data set is a real one that a package ships: scikit-learn's handwritten digits (1,797
8x8 images of the digits 0-9, `sklearn/datasets/data/digits.csv.gz`), copied into the image
at /opt/geomx/data/digits.csv.gz. A fixed shuffle keeps 297 images for testing; every worker
trains a two-layer perceptron on its own slice of the other 1,500 (--data-slice-idx, default:
its rank) and, like GeoMX's examples, prints one progress line per iteration after
evaluating the test set:

    [Time 1.234][Epoch 0][Iteration 17] Test Acc 0.9312

Scheduler and servers need no script: `python3 -c "import mxnet"` with DMLC_ROLE set runs
them.
"""

import argparse
import gzip
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

CLASSES = 10
TEST = 297
DIGITS = "/opt/geomx/data/digits.csv.gz"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-slice-idx", type=int, default=None,
                   help="which slice of the training set this worker trains on (default: its rank)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data", default=DIGITS,
                   help="the digits CSV (64 pixel values 0-16 and the label per line)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--kvstore", default="dist_sync")
    p.add_argument("--cpu", action="store_true", help="accepted for GeoMX compatibility; always CPU")
    return p.parse_args()


def dataset(path):
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype="float32")
    except OSError as e:
        raise SystemExit(f"cannot read the digits data set {path}: {e}")
    if table.ndim != 2 or table.shape[1] != 65:
        raise SystemExit(f"{path}: expected 65 columns (64 pixels and the label), "
                         f"found shape {table.shape}")
    order = np.random.RandomState(42).permutation(len(table))
    table = table[order]
    x, y = table[:, :64] / 16.0, table[:, 64]
    return (x[TEST:], y[TEST:]), (x[:TEST], y[:TEST])


def main():
    args = parse_args()
    kv = mx.kv.create(args.kvstore)
    rank, workers = kv.rank, kv.num_workers
    slice_idx = rank if args.data_slice_idx is None else args.data_slice_idx
    if not 0 <= slice_idx < workers:
        raise SystemExit(f"--data-slice-idx {slice_idx} is outside [0, {workers})")
    print(f"Start training on {workers} workers, my rank is {rank}.", flush=True)

    (x, y), (tx, ty) = dataset(args.data)
    part = len(x) // workers
    x, y = x[slice_idx * part:(slice_idx + 1) * part], y[slice_idx * part:(slice_idx + 1) * part]
    train = gluon.data.DataLoader(gluon.data.ArrayDataset(x, y), batch_size=args.batch_size,
                                  shuffle=True, last_batch="discard")
    test_x, test_y = mx.nd.array(tx), mx.nd.array(ty)

    mx.random.seed(1)
    net = gluon.nn.Sequential()
    net.add(gluon.nn.Dense(64, activation="relu"), gluon.nn.Dense(CLASSES))
    net.initialize(mx.init.Xavier())
    trainer = gluon.Trainer(net.collect_params(), "sgd",
                            {"learning_rate": args.lr, "momentum": 0.9}, kvstore=kv)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    start = time.time()
    iteration = 0
    for epoch in range(args.epochs):
        for data, label in train:
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            trainer.step(args.batch_size)
            iteration += 1
            pred = net(test_x).argmax(axis=1)
            acc = (pred == test_y).mean().asscalar()
            print(f"[Time {time.time() - start:.3f}][Epoch {epoch}][Iteration {iteration}] "
                  f"Test Acc {acc:.4f}", flush=True)
    print(f"Finished {iteration} iterations in {time.time() - start:.1f}s.", flush=True)


if __name__ == "__main__":
    main()
