//! `geomx.v1.JobService` over [`Jobs`] (authorization is done by the service's interceptor,
//! which leaves the caller, [`Caller`], in the request: submit and cancel record its name).
//!
//! Job names may be given as `NAME` (the latest run) or `NAME#RUN` (an earlier run of a
//! reused name) to `GetJob`, `WatchJob` and `JobEvents`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use geomx_proto::v1::job_service_server::JobService;
use geomx_proto::v1::{
    CancelJobRequest, GetJobRequest, Job, JobEventsRequest, JobEventsResponse, JobPhase,
    ListJobsRequest, ListJobsResponse, LogChunk, RemoveJobRequest, RemoveJobResponse,
    SubmitJobRequest, SubmitJobResponse, UserLogsRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::Jobs;
use super::view::without_ages;
use crate::auth::Caller;

/// Least time between two `WatchJob` messages caused by heartbeats alone (progress);
/// transitions are sent at once.
pub const WATCH_REPORT_INTERVAL: Duration = Duration::from_millis(500);

/// Implementation of `JobService`.
#[derive(Clone, Debug)]
pub struct JobApi {
    jobs: Arc<Jobs>,
    shutdown: CancellationToken,
    streams: TaskTracker,
}

impl JobApi {
    /// The service over `jobs`; `WatchJob` streams end when `shutdown` is cancelled and
    /// their tasks are tracked by `streams`.
    pub fn new(jobs: Arc<Jobs>, shutdown: CancellationToken, streams: TaskTracker) -> Self {
        JobApi {
            jobs,
            shutdown,
            streams,
        }
    }
}

fn is_terminal(job: &Job) -> bool {
    matches!(
        JobPhase::try_from(job.phase),
        Ok(JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled)
    )
}

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let job = self
            .jobs
            .submit(&req.file_name, &req.job_toml, &caller.name)
            .await?;
        Ok(Response::new(SubmitJobResponse { job: Some(job) }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        self.jobs.get(&request.get_ref().name).map(Response::new)
    }

    async fn list_jobs(
        &self,
        _request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        Ok(Response::new(ListJobsResponse {
            jobs: self.jobs.list(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let caller = Caller::of(&request);
        self.jobs
            .cancel(&request.get_ref().name, &caller.name)
            .await
            .map(Response::new)
    }

    async fn remove_job(
        &self,
        request: Request<RemoveJobRequest>,
    ) -> Result<Response<RemoveJobResponse>, Status> {
        self.jobs
            .remove(&request.get_ref().name)
            .await
            .map(Response::new)
    }

    type WatchJobStream = ReceiverStream<Result<Job, Status>>;

    async fn watch_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("the controller is shutting down"));
        }
        let (name, run) = self.jobs.resolve(&request.get_ref().name)?;
        let (tx, rx) = mpsc::channel(8);
        let span = tracing::info_span!("watch_job", job = %name, run);
        self.streams.spawn(
            watch_loop(self.jobs.clone(), name, run, tx, self.shutdown.clone()).instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn job_events(
        &self,
        request: Request<JobEventsRequest>,
    ) -> Result<Response<JobEventsResponse>, Status> {
        let events = self.jobs.events(&request.get_ref().name)?;
        Ok(Response::new(JobEventsResponse { events }))
    }

    type NodeLogsStream = BoxStream<'static, Result<LogChunk, Status>>;

    async fn node_logs(
        &self,
        request: Request<UserLogsRequest>,
    ) -> Result<Response<Self::NodeLogsStream>, Status> {
        self.jobs
            .logs(request.into_inner())
            .await
            .map(Response::new)
    }
}

/// Sends run `run` of `name` at once, then after every change, until it ends, the client
/// goes away, or the controller shuts down.
async fn watch_loop(
    jobs: Arc<Jobs>,
    name: String,
    run: u32,
    tx: mpsc::Sender<Result<Job, Status>>,
    shutdown: CancellationToken,
) {
    let mut changes = jobs.subscribe_changes();
    let mut reports = jobs.subscribe_reports();
    let mut last: Option<Job> = None;
    let mut last_sent = Instant::now();
    loop {
        changes.borrow_and_update();
        reports.borrow_and_update();
        let job = match jobs.get_run(&name, run) {
            Ok(j) => j,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                break;
            }
        };
        let ended = is_terminal(&job);
        let bare = without_ages(&job);
        if last.as_ref() != Some(&bare) {
            tokio::select! {
                sent = tx.send(Ok(job)) => if sent.is_err() { break },
                () = shutdown.cancelled() => break,
            }
            last = Some(bare);
            last_sent = Instant::now();
        }
        if ended {
            break;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            changed = reports.changed() => {
                if changed.is_err() {
                    break;
                }
                // Heartbeat-only changes: at most one message per interval, but a
                // transition during the wait is sent at once.
                let wait = WATCH_REPORT_INTERVAL.saturating_sub(last_sent.elapsed());
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = changes.changed() => {}
                    () = shutdown.cancelled() => break,
                }
            }
            () = tx.closed() => break,
            () = shutdown.cancelled() => {
                let _ = tx.try_send(Err(Status::unavailable("the controller is shutting down")));
                break;
            }
        }
    }
}
