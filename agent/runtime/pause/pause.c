/*
 * geomx pause: the process of a network sandbox container (see geomx-runtime's pause
 * module). It holds the sandbox's network namespace and does nothing else: it sleeps
 * until SIGTERM or SIGINT and then exits 0, and reaps any child that gets re-parented to
 * it (it runs as PID 1 of the container). The same idea as Kubernetes' pause container.
 *
 * Built by agent/runtime/build.rs as a static, stripped binary (cc -static -Os -s) and
 * imported into Docker as the image geomx/pause:<version> with this binary as /pause.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void say(int fd, const char *msg) {
    ssize_t r = write(fd, msg, strlen(msg));
    (void)r;
}

static void stop(int signo) {
    (void)signo;
    _exit(0);
}

static void reap(int signo) {
    (void)signo;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && (strcmp(argv[1], "-v") == 0 || strcmp(argv[1], "--version") == 0)) {
        say(1, "geomx pause\n");
        return 0;
    }
    if (getpid() != 1) {
        say(2, "geomx pause: warning: not PID 1 of a container\n");
    }

    struct sigaction down;
    memset(&down, 0, sizeof down);
    down.sa_handler = stop;
    sigemptyset(&down.sa_mask);
    if (sigaction(SIGINT, &down, NULL) < 0 || sigaction(SIGTERM, &down, NULL) < 0) {
        say(2, "geomx pause: sigaction failed\n");
        return 1;
    }

    struct sigaction children;
    memset(&children, 0, sizeof children);
    children.sa_handler = reap;
    children.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    sigemptyset(&children.sa_mask);
    if (sigaction(SIGCHLD, &children, NULL) < 0) {
        say(2, "geomx pause: sigaction failed\n");
        return 1;
    }

    for (;;) {
        pause();
    }
    return 42; /* not reached */
}
