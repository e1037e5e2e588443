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
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <linux/keyctl.h>
#include <linux/perf_event.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
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

/* Fork children that wait forever, without end; say once how many were made before the first
 * fork was refused. With own_uids, each child takes a uid of its own first. */
static void fork_loop(int own_uids) {
    long got = 0;
    int reported = 0;
    for (;;) {
        pid_t pid = fork();
        if (pid == 0) {
            if (own_uids && syscall(SYS_setresuid, 1000 + got, 1000 + got, 1000 + got) < 0)
                _exit(1);
            pause();
            _exit(0);
        }
        if (pid > 0) {
            got++;
        } else if (!reported) {
            printf("refused after %ld\n", got);
            fflush(stdout);
            reported = 1;
        }
    }
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
    if (!strcmp(cmd, "connect-abstract") && argc == 3) {
        /* A Unix socket in the abstract namespace (per network namespace, no permissions). */
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        size_t n = strlen(argv[2]);
        if (n > sizeof a.sun_path - 1)
            n = sizeof a.sun_path - 1;
        memcpy(a.sun_path + 1, argv[2], n);
        return result(connect(s, (struct sockaddr *)&a, offsetof(struct sockaddr_un, sun_path) + 1 + n));
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
    /* Kernel keyring of the session: a key is added to / searched in the session keyring. */
    if (!strcmp(cmd, "keyctl"))
        return result(syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0) < 0 ? -1 : 0);
    if (!strcmp(cmd, "addkey") && argc == 3)
        return result(syscall(SYS_add_key, "user", argv[2], "secret", 6, KEY_SPEC_SESSION_KEYRING) < 0 ? -1 : 0);
    if (!strcmp(cmd, "findkey") && argc == 3)
        return result(syscall(SYS_keyctl, KEYCTL_SEARCH, KEY_SPEC_SESSION_KEYRING, "user", argv[2], 0) < 0 ? -1 : 0);
    if (!strcmp(cmd, "perf")) {
        /* A NULL attribute: EFAULT from the kernel, EPERM from a filter. */
        return result(syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0) < 0 ? -1 : 0);
    }
    if (!strcmp(cmd, "bpf"))
        return result(syscall(SYS_bpf, 0, NULL, 0) < 0 ? -1 : 0);
    if (!strcmp(cmd, "userfaultfd"))
        return result(syscall(SYS_userfaultfd, 1 /* UFFD_USER_MODE_ONLY */) < 0 ? -1 : 0);
    if (!strcmp(cmd, "unshare-user"))
        return result(unshare(CLONE_NEWUSER));
    if (!strcmp(cmd, "clone-user")) {
        long pid = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
        if (pid == 0)
            _exit(0);
        if (pid < 0)
            return result(-1);
        waitpid(pid, NULL, 0);
        return result(0);
    }
    if (!strcmp(cmd, "clone3-user")) {
        unsigned long long args[8] = {CLONE_NEWUSER, 0, 0, 0, SIGCHLD, 0, 0, 0};
        long pid = syscall(SYS_clone3, args, sizeof args);
        if (pid == 0)
            _exit(0);
        if (pid < 0)
            return result(-1);
        waitpid(pid, NULL, 0);
        return result(0);
    }
    if (!strcmp(cmd, "personality") && argc == 3)
        return result(personality(strtoul(argv[2], NULL, 0)) < 0 ? -1 : 0);
    if (!strcmp(cmd, "tiocsti")) {
        char c = 'x';
        return result(ioctl(0, TIOCSTI, &c));
    }
    if (!strcmp(cmd, "mkdir") && argc == 3)
        return result(mkdir(argv[2], 0755));
    /* Fork until refused, keep every child alive, and keep trying: the sandbox's limits must
     * hold it and end it. Prints the number of children it got once the first fork fails. */
    /* forkuids: every child switches to a uid of its own first, so that a per-uid limit
     * (RLIMIT_NPROC) does not hold it: only a limit on the whole sandbox does. */
    if (!strcmp(cmd, "forkloop") || !strcmp(cmd, "forkuids"))
        fork_loop(!strcmp(cmd, "forkuids"));
    /* Touch N MiB of memory, then wait: a memory limit must end it. */
    if (!strcmp(cmd, "alloc") && argc == 3) {
        long mib = atol(argv[2]);
        for (long i = 0; i < mib; i++) {
            char *p = malloc(1 << 20);
            if (!p)
                return result(-1);
            memset(p, 1, 1 << 20);
        }
        puts("allocated");
        fflush(stdout);
        sleep(10);
        return 0;
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
