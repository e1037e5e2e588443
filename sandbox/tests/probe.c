/* A tiny static program the sandbox tests run inside sandboxes to attempt escapes with exact
 * system calls. Built by the tests (or scripts/test.sh) with `cc -static`.
 *
 * Every command prints "ok" and exits 0 when the call succeeded, or prints "err <errno-name>"
 * and exits 1 when it failed, so tests can assert both outcome and reason. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

static int result(int rc) {
    if (rc == 0) {
        puts("ok");
        return 0;
    }
    printf("err %s\n", strerrorname_np(errno) ? strerrorname_np(errno) : "?");
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: probe COMMAND ARGS...\n");
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "ids")) {
        printf("%u %u %u %u\n", getuid(), geteuid(), getgid(), getegid());
        return 0;
    }
    if (!strcmp(cmd, "connect") && argc == 4) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
        inet_pton(AF_INET, argv[2], &a.sin_addr);
        return result(connect(s, (struct sockaddr *)&a, sizeof a));
    }
    if (!strcmp(cmd, "ptrace") && argc == 3)
        return result(ptrace(PTRACE_ATTACH, atoi(argv[2]), 0, 0) < 0 ? -1 : 0);
    if (!strcmp(cmd, "kill") && argc == 4)
        return result(kill(atoi(argv[2]), atoi(argv[3])));
    if (!strcmp(cmd, "sethostname") && argc == 3)
        return result(sethostname(argv[2], strlen(argv[2])));
    if (!strcmp(cmd, "mount-proc") && argc == 3)
        return result(mount("proc", argv[2], "proc", 0, NULL));
    if (!strcmp(cmd, "remount-rw") && argc == 3)
        return result(mount(NULL, argv[2], NULL, MS_REMOUNT | MS_BIND, NULL));
    if (!strcmp(cmd, "umount") && argc == 3)
        return result(umount2(argv[2], MNT_DETACH));
    if (!strcmp(cmd, "chroot") && argc == 3)
        return result(chroot(argv[2]));
    if (!strcmp(cmd, "write") && argc == 4) {
        int fd = open(argv[2], O_WRONLY | O_TRUNC);
        if (fd < 0)
            return result(-1);
        ssize_t n = write(fd, argv[3], strlen(argv[3]));
        return result(n < 0 ? -1 : 0);
    }
    if (!strcmp(cmd, "read") && argc == 3) {
        int fd = open(argv[2], O_RDONLY);
        return result(fd < 0 ? -1 : 0);
    }
    /* "nested CMD ARGS": first enter a new user and mount namespace, which gives back every
     * capability there, then run CMD. Mounts copied from the sandbox must stay locked. */
    if (!strcmp(cmd, "nested") && argc >= 3) {
        if (unshare(CLONE_NEWUSER | CLONE_NEWNS) < 0)
            return result(-1);
        return main(argc - 1, argv + 1);
    }
    fprintf(stderr, "probe: unknown command %s\n", cmd);
    return 2;
}
