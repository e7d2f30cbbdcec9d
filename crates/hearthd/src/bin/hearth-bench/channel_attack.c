/* hearth-bench hostile: a hostile process inside the guest that takes the agent's own channel.
 * It copies the descriptor of the agent's virtio-serial port out of PID 1 (pidfd_getfd: root in
 * the guest may) and writes a file of prepared bytes onto it, over and over, for a number of
 * seconds, interleaved with whatever the agent writes: what a compromised guest can send.
 * Usage: channel-attack FILE SECONDS */
#define _GNU_SOURCE
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int agent_port(void) {
    DIR *d = opendir("/proc/1/fd");
    struct dirent *e;
    char path[64], target[256];
    if (!d) return -1;
    while ((e = readdir(d))) {
        snprintf(path, sizeof path, "/proc/1/fd/%s", e->d_name);
        ssize_t n = readlink(path, target, sizeof target - 1);
        if (n <= 0) continue;
        target[n] = 0;
        if (!strncmp(target, "/dev/vport", 10)) {
            closedir(d);
            return atoi(e->d_name);
        }
    }
    closedir(d);
    return -1;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror(argv[1]); return 1; }
    static char buf[8 << 20];
    size_t len = fread(buf, 1, sizeof buf, f);
    int target = agent_port();
    if (target < 0) { fprintf(stderr, "no agent port in /proc/1/fd\n"); return 1; }
    int pidfd = syscall(SYS_pidfd_open, 1, 0);
    int fd = pidfd < 0 ? -1 : syscall(SYS_pidfd_getfd, pidfd, target, 0);
    if (fd < 0) { perror("pidfd_getfd"); return 1; }
    time_t end = time(NULL) + atoi(argv[2]);
    unsigned long long sent = 0;
    while (time(NULL) < end) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) { perror("write"); return 1; }
        sent += n;
    }
    printf("%llu\n", sent);
    return 0;
}
