"""A C client that opens many non-blocking connections at once and reports how they ended.

argv: count, seconds to watch, destination IPv4 (port 80). Prints one line:
``ok N err110 N other N silent N`` (connected, ETIMEDOUT, any other error, no answer yet).
"""

from __future__ import annotations

import os
import subprocess
from typing import Dict

SOURCE = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
                          return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    int m = atoi(argv[1]); double window = atof(argv[2]);
    struct rlimit rl; getrlimit(RLIMIT_NOFILE, &rl); rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(80)};
    inet_pton(AF_INET, argv[3], &a.sin_addr);
    int ep = epoll_create1(0), *fds = calloc(m, sizeof(int));
    int ok = 0, e110 = 0, other = 0, pending = 0;
    double t0 = now();
    for (int i = 0; i < m; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (connect(fds[i], (struct sockaddr *)&a, sizeof a) == 0) { ok++; continue; }
        if (errno != EINPROGRESS) { if (errno == ETIMEDOUT) e110++; else other++; continue; }
        struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
        pending++;
    }
    struct epoll_event evs[64];
    while (pending > 0 && now() - t0 < window) {
        int n = epoll_wait(ep, evs, 64, 50);
        for (int k = 0; k < n; k++) {
            int fd = fds[evs[k].data.u32], err = 0; socklen_t l = sizeof err;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l);
            if (err == 0) ok++; else if (err == ETIMEDOUT) e110++; else other++;
            epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
            pending--;
        }
    }
    printf("ok %d err110 %d other %d silent %d\n", ok, e110, other, pending);
    return 0;
}
"""


def build(user_tmp: str) -> str:
    """Compile the client into the test user's directory; returns the executable's path."""
    src, exe = os.path.join(user_tmp, "storm.c"), os.path.join(user_tmp, "storm")
    with open(src, "w") as f:
        f.write(SOURCE)
    subprocess.run(["cc", "-O2", "-o", exe, src], check=True)
    os.chmod(exe, 0o755)
    return exe


def counts(line: str) -> Dict[str, int]:
    words = line.split()
    return {k: int(v) for k, v in zip(words[::2], words[1::2])}
