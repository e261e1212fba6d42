/*
 * nsvpn LD_PRELOAD shim (libc only): diverts TCP connect() and failed name lookups of an
 * unmodified program to nsvpn's local front (nsvpn/front.py), which dials the upstream.
 *
 * `nsvpn probe` runs `true` with this library and NSVPN_PROBE_FD=<fd>; the constructor writes a
 * marker line to that fd (proof that it loads). The hooks are inert unless the front's
 * settings are in the environment (NSVPN_CTL, NSVPN_FRONT_PORT4, ...; see shim_init()).
 *
 * Design (why it looks like this)
 * -------------------------------
 * Two channels to the front:
 *  - the *data* connection: the program's own socket (AF_INET or AF_INET6, unchanged family,
 *    options, fd number) is connect()ed to the front at 127.0.0.1:PORT4 (AF_INET6 sockets:
 *    ::ffff:127.0.0.1, or [::1]:PORT6 when IPV6_V6ONLY is set). An AF_INET socket cannot be
 *    connected to a unix path, and dup2()ing a unix socket over the fd would change its family
 *    and break getsockopt/TCP options, so the data path stays TCP over loopback.
 *  - the *control* channel: a unix stream socket in nsvpn's 0700 runtime directory, one short
 *    request per connection (no shared state: nothing to lock, nothing to fix after fork,
 *    close_range() or threads). Only the user can reach it, so a claim made over it is
 *    authenticated by the kernel. The TCP port itself is open to every local user, but the
 *    front serves a connection only when (a) the control channel claimed it (by its source
 *    port) and the first 16 bytes on it are the claim's random token, or (b) it speaks SOCKS5
 *    with the per-session user/password from ALL_PROXY (for SOCKS-aware programs). Another
 *    user has neither.
 *
 * Blocking sockets: connect to the front, write the token, claim "<port> -> destination" and
 * wait on the control channel for the front's answer: the upstream's real outcome, as errno
 * (ECONNREFUSED, ENETUNREACH, EHOSTUNREACH, ETIMEDOUT, ...).
 *
 * Non-blocking sockets (epoll/poll/select loops, curl multi, asyncio, XrdCl): connect() must not
 * wait for the upstream, yet the socket must not look writable ("connected") before the
 * upstream CONNECT succeeded. The loopback handshake itself completes at once, so readiness is
 * gated in a different way: the shim writes a padding stream (the token, then zeros) until the
 * front's receive window is full and 32 KB stay unsent, then sets TCP_NOTSENT_LOWAT=1. A socket
 * with unsent bytes above its NOTSENT_LOWAT is not writable, for every readiness API alike
 * (epoll, poll, select, level- or edge-triggered). The front locks a tiny receive buffer on its
 * listener, so that window stays shut (~50 KB of padding in all) instead of growing for a while
 * as an autotuned buffer's would; the little it still opens cannot drain 32 KB. When the kernel
 * will not leave bytes unsent at all, connect() waits for the front's answer instead.
 * The shim then claims the connection (destination + padding length) and returns EINPROGRESS
 * without waiting for any answer (front protocol 2, NSVPN_FRONT_PROTO; a front that does not
 * say so, e.g. a tunnel started by an older nsvpn, first acknowledges the claim). The front
 * dials; on success it reads and drops exactly the padding, the window opens, the last
 * padding leaves, and the program's socket becomes writable: the program
 * sees "connected" exactly when the upstream is. On failure the front resets the connection;
 * the program sees POLLERR and asks getsockopt(SO_ERROR), which this shim answers with the
 * front's verdict instead of the kernel's ECONNRESET. The socket's NOTSENT_LOWAT goes back to
 * its old value when the program first asks SO_ERROR or getpeername after success ("released":
 * no unsent bytes, or all padding acknowledged per TCP_INFO, whatever the program wrote since).
 * A connect() repeated on a pending socket says EALREADY, then EISCONN. TCP Fast Open
 * (sendto/sendmsg with MSG_FASTOPEN) takes the same path as connect().
 * Trade-offs: a program that never calls getsockopt(SO_ERROR) and learns the failure from
 * read()/write() sees ECONNRESET, not the exact errno; a connect() failure leaves the socket
 * connected-then-reset instead of unconnected (a second connect() on it is not supported).
 * getsockname() shows the loopback address of the data connection. A blocking connect is not
 * interrupted by signals (as with SA_RESTART; alarm()-style timeouts do not cut it short);
 * SO_SNDTIMEO and the front's connect timeout bound it. dup()ed descriptors answer
 * getpeername() (via the front) but not the SO_ERROR translation.
 *
 * Fake IPs: when the host resolver cannot answer a name (not found / try again / failure), the
 * shim asks the front for an address from its fake-IP table (198.18.0.0/15, shared by every
 * process of the session since it lives in the front); connecting to it makes the front CONNECT
 * by name. A name already in the table is answered before the host resolver is asked again
 * (nodes without working DNS would otherwise pay the resolver timeout on every lookup).
 * Numeric strings and AI_NUMERICHOST are never faked. getnameinfo/gethostbyaddr of a fake IP
 * return the name. glibc's own resolver sockets are internal calls this shim does not
 * see; programs that speak DNS themselves (dig, c-ares, Go) and send UDP to port 53 of a
 * non-direct address are redirected to the front's DNS responder (same policy and fake-IP
 * table; recvfrom/recvmsg/getpeername show the server they asked). Other UDP to non-direct
 * destinations fails with ENETUNREACH and a line on stderr. DNS servers inside the direct
 * networks are left alone.
 *
 * exec with a scrubbed environment: batch systems build a job's environment from scratch
 * (HTCondor's starter does), so LD_PRELOAD and the front's settings would be lost below such a
 * point, and the job would have no network while the same job in namespace mode has. The
 * exec family (fexecve and execveat too) and posix_spawn put them back when the new
 * environment has no NSVPN_CTL at all (an empty NSVPN_CTL= says "no session here": nsvpn
 * sets it for a command that must not inherit an enclosing session). No malloc there: it
 * runs between fork and exec.
 *
 * Rules for the code: libc only, no locks, no malloc on the connect path (getaddrinfo results
 * must be malloc'ed: that is the API), errno preserved on pass-through paths, every hook falls
 * back to the real function when the shim is not configured.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define NSVPN_SHIM_VERSION "nsvpn-shim 0.2"
#define EXPORT __attribute__((visibility("default")))

#ifndef TCP_NOTSENT_LOWAT
#define TCP_NOTSENT_LOWAT 25
#endif

EXPORT const char nsvpn_shim_version[] = NSVPN_SHIM_VERSION;

/* ------------------------------------------------------------------ real functions */

typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*getpeername_fn)(int, struct sockaddr *, socklen_t *);
typedef int (*getsockopt_fn)(int, int, int, void *, socklen_t *);
typedef ssize_t (*sendto_fn)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
typedef ssize_t (*sendmsg_fn)(int, const struct msghdr *, int);
typedef ssize_t (*recvfrom_fn)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
typedef ssize_t (*recvmsg_fn)(int, struct msghdr *, int);
typedef int (*getaddrinfo_fn)(const char *, const char *, const struct addrinfo *,
                              struct addrinfo **);
typedef int (*getnameinfo_fn)(const struct sockaddr *, socklen_t, char *, socklen_t, char *,
                              socklen_t, int);
typedef struct hostent *(*ghbn_fn)(const char *);
typedef struct hostent *(*ghbn2_fn)(const char *, int);
typedef int (*ghbn_r_fn)(const char *, struct hostent *, char *, size_t, struct hostent **,
                         int *);
typedef int (*ghbn2_r_fn)(const char *, int, struct hostent *, char *, size_t,
                          struct hostent **, int *);
typedef struct hostent *(*ghba_fn)(const void *, socklen_t, int);
typedef int (*ghba_r_fn)(const void *, socklen_t, int, struct hostent *, char *, size_t,
                         struct hostent **, int *);

typedef int (*epoll_ctl_fn)(int, int, int, struct epoll_event *);
typedef int (*execve_fn)(const char *, char *const[], char *const[]);
typedef int (*execvpe_fn)(const char *, char *const[], char *const[]);
typedef int (*fexecve_fn)(int, char *const[], char *const[]);
typedef int (*execveat_fn)(int, const char *, char *const[], char *const[], int);
typedef int (*spawn_fn)(pid_t *, const char *, const posix_spawn_file_actions_t *,
                        const posix_spawnattr_t *, char *const[], char *const[]);

static connect_fn real_connect;
static execve_fn real_execve;
static execvpe_fn real_execvpe;
static fexecve_fn real_fexecve;
static execveat_fn real_execveat;
static spawn_fn real_posix_spawn;
static spawn_fn real_posix_spawnp;
static getpeername_fn real_getpeername;
static getsockopt_fn real_getsockopt;
static sendto_fn real_sendto;
static sendmsg_fn real_sendmsg;
static recvfrom_fn real_recvfrom;
static recvmsg_fn real_recvmsg;
static getaddrinfo_fn real_getaddrinfo;
static getnameinfo_fn real_getnameinfo;
static ghbn_fn real_gethostbyname;
static ghbn2_fn real_gethostbyname2;
static ghbn_r_fn real_gethostbyname_r;
static ghbn2_r_fn real_gethostbyname2_r;
static ghba_fn real_gethostbyaddr;
static ghba_r_fn real_gethostbyaddr_r;
static epoll_ctl_fn real_epoll_ctl;

/* Resolved in the constructor; lazily when another library's constructor calls us first. */
#define REAL(name)                                                                   \
    do {                                                                             \
        if (real_##name == NULL)                                                     \
            real_##name = (__typeof__(real_##name))dlsym(RTLD_NEXT, #name);          \
    } while (0)

/* glibc < 2.34 has no execveat: looked up once (in the constructor), so a child between fork
 * and exec never calls dlsym, which may wait forever for a lock another thread held. */
static int execveat_looked_up;
static void resolve_execveat(void)
{
    if (!execveat_looked_up) {
        real_execveat = (execveat_fn)dlsym(RTLD_NEXT, "execveat");
        execveat_looked_up = 1;
    }
}

static void resolve_all(void)
{
    REAL(connect);
    REAL(getpeername);
    REAL(getsockopt);
    REAL(sendto);
    REAL(sendmsg);
    REAL(recvfrom);
    REAL(recvmsg);
    REAL(getaddrinfo);
    REAL(getnameinfo);
    REAL(gethostbyname);
    REAL(gethostbyname2);
    REAL(gethostbyname_r);
    REAL(gethostbyname2_r);
    REAL(gethostbyaddr);
    REAL(gethostbyaddr_r);
    REAL(epoll_ctl);
    REAL(execve);
    REAL(execvpe);
    REAL(fexecve);
    resolve_execveat();
    REAL(posix_spawn);
    REAL(posix_spawnp);
}

/* ------------------------------------------------------------------ configuration */

#define MAX_DIRECT 64

struct cidr {
    int family; /* AF_INET or AF_INET6 */
    unsigned char addr[16];
    int prefix;
};

static struct {
    int active;
    unsigned short port4, port6;
    unsigned short dns4, dns6; /* the front's UDP DNS responder */
    int proto;                 /* the front's control protocol (NSVPN_FRONT_PROTO; 1 if unset) */
    int handoff;               /* its upstream sockets can be handed over (NSVPN_FRONT_HANDOFF):
                                  1 to AF_INET sockets, 2 to AF_INET6 ones too */
    char ctl[sizeof(((struct sockaddr_un *)0)->sun_path)];
    struct cidr direct[MAX_DIRECT];
    int ndirect;
} cfg;

static int parse_cidr(const char *s, size_t n, struct cidr *out)
{
    char buf[64];
    if (n == 0 || n >= sizeof buf)
        return -1;
    memcpy(buf, s, n);
    buf[n] = '\0';
    char *slash = strchr(buf, '/');
    int prefix = -1;
    if (slash != NULL) {
        *slash = '\0';
        char *end = NULL;
        long p = strtol(slash + 1, &end, 10);
        if (*end != '\0' || p < 0 || p > 128)
            return -1;
        prefix = (int)p;
    }
    memset(out, 0, sizeof *out);
    if (inet_pton(AF_INET, buf, out->addr) == 1) {
        out->family = AF_INET;
        out->prefix = prefix < 0 ? 32 : prefix;
        return out->prefix <= 32 ? 0 : -1;
    }
    if (inet_pton(AF_INET6, buf, out->addr) == 1) {
        out->family = AF_INET6;
        out->prefix = prefix < 0 ? 128 : prefix;
        return 0;
    }
    return -1;
}

static unsigned short env_port(const char *name)
{
    const char *s = getenv(name);
    if (s == NULL || *s == '\0')
        return 0;
    char *end = NULL;
    long v = strtol(s, &end, 10);
    return (*end == '\0' && v > 0 && v < 65536) ? (unsigned short)v : 0;
}

static void probe_marker(void)
{
    const char *s = getenv("NSVPN_PROBE_FD");
    if (s == NULL || *s == '\0')
        return;
    char *end = NULL;
    long fd = strtol(s, &end, 10);
    if (*end != '\0' || fd < 0 || fd > 65535)
        return;
    static const char line[] = NSVPN_SHIM_VERSION "\n";
    /* Best effort: the probe treats a missing marker as "does not load". */
    ssize_t n = write((int)fd, line, sizeof line - 1);
    (void)n;
}

/* ------------------------------------------------------------------ exec: keep the session */

static int shim_active(void);

#define SESSION_VARS_MAX 12
#define EXEC_ENV_MAX 1024  /* entries (8 KB of stack); a larger environment is passed on as is */
#define EXEC_LD_MAX 8192   /* bytes of a merged LD_PRELOAD line */
static char session_store[4096];
static const char *session_vars[SESSION_VARS_MAX]; /* "NSVPN_CTL=...", ... */
static int nsession;
static char shim_file[1024]; /* this library's path, for LD_PRELOAD */

static void remember_session(void)
{
    static const char *const names[] = {"NSVPN_CTL",       "NSVPN_FRONT_PORT4",
                                        "NSVPN_FRONT_PORT6", "NSVPN_DNS_PORT4",
                                        "NSVPN_DNS_PORT6", "NSVPN_DIRECT",
                                        "NSVPN_FRONT_PROTO", "NSVPN_FRONT_HANDOFF"};
    size_t used = 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *v = getenv(names[i]);
        if (v == NULL)
            continue;
        size_t n = strlen(names[i]) + 1 + strlen(v) + 1;
        if (used + n > sizeof session_store)
            return;
        snprintf(session_store + used, n, "%s=%s", names[i], v);
        session_vars[nsession++] = session_store + used;
        used += n;
    }
    Dl_info info;
    if (dladdr((void *)remember_session, &info) != 0 && info.dli_fname != NULL &&
        info.dli_fname[0] == '/' && strlen(info.dli_fname) < sizeof shim_file)
        strcpy(shim_file, info.dli_fname);
}

/* Does a new program's environment lack the session? (None there at all: an empty NSVPN_CTL=
 * is nsvpn saying "no session for this one".) */
static int lacks_session(char *const envp[])
{
    if (!shim_active() || nsession == 0 || shim_file[0] == '\0')
        return 0;
    for (char *const *e = envp; e != NULL && *e != NULL; e++)
        if (strncmp(*e, "NSVPN_CTL=", 10) == 0)
            return 0;
    return 1;
}

static size_t env_count(char *const envp[])
{
    size_t n = 0;
    while (envp != NULL && envp[n] != NULL)
        n++;
    return n;
}

/* Room for the LD_PRELOAD line of the new environment: theirs, a space, ours. */
static size_t ld_room(char *const envp[])
{
    size_t theirs = 0;
    for (char *const *e = envp; e != NULL && *e != NULL; e++)
        if (strncmp(*e, "LD_PRELOAD=", 11) == 0)
            theirs = strlen(*e);
    return theirs + strlen(shim_file) + 16;
}

static int is_session_var(const char *e)
{
    for (int i = 0; i < nsession; i++) {
        size_t k = (size_t)(strchr(session_vars[i], '=') - session_vars[i]) + 1;
        if (strncmp(e, session_vars[i], k) == 0)
            return 1;
    }
    return 0;
}

/* envp plus the session into out[] (env_count + SESSION_VARS_MAX + 2 slots); ld[] holds the
 * LD_PRELOAD line. Only memcpy/strlen/strncmp: this runs between fork and exec. */
static char *const *with_session(char *const envp[], char **out, char *ld, size_t ldcap)
{
    size_t k = 0, plen = strlen(shim_file);
    int have_ld = 0;
    for (char *const *e = envp; e != NULL && *e != NULL; e++) {
        if (is_session_var(*e))
            continue; /* stale pieces of a session: ours replace them */
        if (!have_ld && strncmp(*e, "LD_PRELOAD=", 11) == 0) {
            have_ld = 1;
            size_t n = strlen(*e);
            if (strstr(*e + 11, shim_file) == NULL && n + 1 + plen + 1 <= ldcap) {
                memcpy(ld, *e, n);
                ld[n] = ' ';
                memcpy(ld + n + 1, shim_file, plen + 1);
                out[k++] = ld;
                continue;
            }
        }
        out[k++] = *e;
    }
    if (!have_ld && 11 + plen + 1 <= ldcap) {
        memcpy(ld, "LD_PRELOAD=", 11);
        memcpy(ld + 11, shim_file, plen + 1);
        out[k++] = ld;
    }
    for (int i = 0; i < nsession; i++)
        out[k++] = (char *)session_vars[i];
    out[k] = NULL;
    return out;
}

/* The hooks: a VLA for the new environment (no malloc after fork), else pass through. */
#define SESSION_ENV(envp, call)                                                            \
    do {                                                                                   \
        if (lacks_session(envp)) { /* sizes only then: most execs keep the session */      \
            size_t n_ = env_count(envp), ldcap_ = ld_room(envp);                           \
            if (n_ <= EXEC_ENV_MAX && ldcap_ <= EXEC_LD_MAX) {                             \
                char *out_[n_ + SESSION_VARS_MAX + 2];                                     \
                char ld_[ldcap_];                                                          \
                char *const *env_ = with_session(envp, out_, ld_, ldcap_);                 \
                return call;                                                               \
            }                                                                              \
        }                                                                                  \
    } while (0)

EXPORT int execve(const char *path, char *const argv[], char *const envp[])
{
    REAL(execve);
    SESSION_ENV(envp, real_execve(path, argv, env_));
    return real_execve(path, argv, envp);
}

EXPORT int execvpe(const char *file, char *const argv[], char *const envp[])
{
    REAL(execvpe);
    SESSION_ENV(envp, real_execvpe(file, argv, env_));
    return real_execvpe(file, argv, envp);
}

EXPORT int fexecve(int fd, char *const argv[], char *const envp[])
{
    REAL(fexecve);
    SESSION_ENV(envp, real_fexecve(fd, argv, env_));
    return real_fexecve(fd, argv, envp);
}

/* glibc has the wrapper since 2.34; before that, programs make the system call themselves
 * (which no shim sees), and ours does it too (kernel headers older than 3.19 lack it). */
EXPORT int execveat(int dirfd, const char *path, char *const argv[], char *const envp[],
                    int flags)
{
    resolve_execveat();
    if (real_execveat == NULL) {
#ifdef SYS_execveat
        SESSION_ENV(envp, (int)syscall(SYS_execveat, dirfd, path, argv, env_, flags));
        return (int)syscall(SYS_execveat, dirfd, path, argv, envp, flags);
#else
        errno = ENOSYS;
        return -1;
#endif
    }
    SESSION_ENV(envp, real_execveat(dirfd, path, argv, env_, flags));
    return real_execveat(dirfd, path, argv, envp, flags);
}

EXPORT int execv(const char *path, char *const argv[])
{
    return execve(path, argv, environ);
}

EXPORT int execvp(const char *file, char *const argv[])
{
    return execvpe(file, argv, environ);
}

/* execl/execlp/execle: the arguments into an array, then the calls above. */
#define VARARGS_ARGV(first, ap, argv_name)                                                  \
    size_t argc_ = 1;                                                                      \
    va_start(ap, first);                                                                   \
    while (va_arg(ap, const char *) != NULL)                                               \
        argc_++;                                                                           \
    va_end(ap);                                                                            \
    char *argv_name[argc_ + 1];                                                            \
    argv_name[0] = (char *)first;                                                          \
    va_start(ap, first);                                                                   \
    for (size_t i_ = 1; i_ <= argc_; i_++)                                                 \
        argv_name[i_] = va_arg(ap, char *);

EXPORT int execl(const char *path, const char *arg, ...)
{
    va_list ap;
    VARARGS_ARGV(arg, ap, argv)
    va_end(ap);
    return execve(path, argv, environ);
}

EXPORT int execlp(const char *file, const char *arg, ...)
{
    va_list ap;
    VARARGS_ARGV(arg, ap, argv)
    va_end(ap);
    return execvpe(file, argv, environ);
}

EXPORT int execle(const char *path, const char *arg, ...)
{
    va_list ap;
    VARARGS_ARGV(arg, ap, argv)
    char *const *envp = va_arg(ap, char *const *);
    va_end(ap);
    return execve(path, argv, envp);
}

EXPORT int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                       const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
    REAL(posix_spawn);
    SESSION_ENV(envp, real_posix_spawn(pid, path, fa, attr, argv, env_));
    return real_posix_spawn(pid, path, fa, attr, argv, envp);
}

EXPORT int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *fa,
                        const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
    REAL(posix_spawnp);
    SESSION_ENV(envp, real_posix_spawnp(pid, file, fa, attr, argv, env_));
    return real_posix_spawnp(pid, file, fa, attr, argv, envp);
}

static void shim_setup(void);
static int init_state; /* 0: not yet, 1: being read, 2: read */

/* Is the shim configured for a session? The configuration is read on first use: another
 * library's constructor may resolve names or connect before this shim's constructor runs
 * (libXrdUtils looks up its own host's name and address then; preloaded libraries are
 * initialised after the program's own). */
static int shim_active(void)
{
    if (__atomic_load_n(&init_state, __ATOMIC_ACQUIRE) != 2) {
        int s = 0;
        if (__atomic_compare_exchange_n(&init_state, &s, 1, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED)) {
            shim_setup();
            __atomic_store_n(&init_state, 2, __ATOMIC_RELEASE);
        } else {
            while (__atomic_load_n(&init_state, __ATOMIC_ACQUIRE) != 2) {
                struct timespec ts = {0, 100000};
                nanosleep(&ts, NULL);
            }
        }
    }
    return cfg.active;
}

__attribute__((constructor)) static void shim_init(void)
{
    shim_active();
}

static void shim_setup(void)
{
    int saved = errno;
    resolve_all();
    probe_marker();
    const char *ctl = getenv("NSVPN_CTL");
    cfg.port4 = env_port("NSVPN_FRONT_PORT4");
    cfg.port6 = env_port("NSVPN_FRONT_PORT6");
    cfg.dns4 = env_port("NSVPN_DNS_PORT4");
    cfg.dns6 = env_port("NSVPN_DNS_PORT6");
    /* a tunnel started by an older nsvpn (`exec --name` after an upgrade) speaks protocol 1 */
    const char *proto = getenv("NSVPN_FRONT_PROTO");
    cfg.proto = proto != NULL && atoi(proto) >= 2 ? 2 : 1;
    const char *handoff = getenv("NSVPN_FRONT_HANDOFF");
    cfg.handoff = cfg.proto >= 2 && handoff != NULL && (strcmp(handoff, "1") == 0 ||
                                                         strcmp(handoff, "2") == 0)
                      ? atoi(handoff) : 0;
    if (ctl != NULL && *ctl == '/' && strlen(ctl) < sizeof cfg.ctl && cfg.port4 != 0) {
        strcpy(cfg.ctl, ctl);
        const char *d = getenv("NSVPN_DIRECT");
        while (d != NULL && *d != '\0' && cfg.ndirect < MAX_DIRECT) {
            size_t n = strcspn(d, ", ");
            if (n > 0 && parse_cidr(d, n, &cfg.direct[cfg.ndirect]) == 0)
                cfg.ndirect++;
            d += n;
            d += strspn(d, ", ");
        }
        cfg.active = 1;
        remember_session();
    }
    errno = saved;
}

/* ------------------------------------------------------------------ logging */

static int log_lines; /* racy counter: at worst a few extra lines */

static void shim_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void shim_log(const char *fmt, ...)
{
    if (log_lines >= 20)
        return;
    log_lines++;
    char buf[320];
    int n = snprintf(buf, sizeof buf, "nsvpn[%d]: ", (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        return;
    size_t len = (size_t)n + ((size_t)m < sizeof buf - (size_t)n - 1 ? (size_t)m
                                                                       : sizeof buf - (size_t)n - 2);
    buf[len++] = '\n';
    /* a daemon that closed stderr may have a socket at fd 2: never write into its data */
    struct stat st;
    if (fstat(2, &st) < 0 || S_ISSOCK(st.st_mode))
        return;
    ssize_t w = write(2, buf, len);
    (void)w;
}

/* ------------------------------------------------------------------ addresses */

struct dest {
    int family; /* AF_INET (also for v4-mapped IPv6) or AF_INET6 */
    unsigned char a[16];
    unsigned short port;
};

static const unsigned char v4mapped_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

static int parse_dest(const struct sockaddr *sa, socklen_t len, struct dest *d)
{
    memset(d, 0, sizeof *d);
    if (sa->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        d->family = AF_INET;
        memcpy(d->a, &in->sin_addr, 4);
        d->port = ntohs(in->sin_port);
        return 0;
    }
    /* 24 bytes: the RFC 2133 sockaddr_in6 without sin6_scope_id, which Linux accepts too */
    if (sa->sa_family == AF_INET6 && len >= 24) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        const unsigned char *b = in6->sin6_addr.s6_addr;
        d->port = ntohs(in6->sin6_port);
        if (memcmp(b, v4mapped_prefix, 12) == 0) {
            d->family = AF_INET;
            memcpy(d->a, b + 12, 4);
        } else {
            d->family = AF_INET6;
            memcpy(d->a, b, 16);
        }
        return 0;
    }
    return -1;
}

static int prefix_match(const unsigned char *a, const unsigned char *net, int prefix)
{
    int full = prefix / 8, rest = prefix % 8;
    if (memcmp(a, net, (size_t)full) != 0)
        return 0;
    if (rest == 0)
        return 1;
    unsigned char mask = (unsigned char)(0xff << (8 - rest));
    return (a[full] & mask) == (net[full] & mask);
}

static int is_fake4(const unsigned char *a)
{
    return a[0] == 198 && (a[1] & 0xfe) == 18; /* 198.18.0.0/15 */
}

static int is_direct(const struct dest *d)
{
    if (d->family == AF_INET) {
        if (is_fake4(d->a))
            return 0;
        if (d->a[0] == 127 || d->a[0] == 0 || d->a[0] >= 224) /* loopback, "this", mcast */
            return 1;
        if (d->a[0] == 169 && d->a[1] == 254) /* link-local: never routed anywhere */
            return 1;
    } else {
        static const unsigned char zero[16];
        if (memcmp(d->a, zero, 15) == 0 && (d->a[15] == 1 || d->a[15] == 0)) /* ::1, :: */
            return 1;
        if (d->a[0] == 0xff || (d->a[0] == 0xfe && (d->a[1] & 0xc0) == 0x80))
            return 1; /* multicast, link-local */
    }
    for (int i = 0; i < cfg.ndirect; i++)
        if (cfg.direct[i].family == d->family &&
            prefix_match(d->a, cfg.direct[i].addr, cfg.direct[i].prefix))
            return 1;
    return 0;
}

static void dest_text(const struct dest *d, char *out, size_t n)
{
    if (inet_ntop(d->family, d->a, out, (socklen_t)n) == NULL)
        snprintf(out, n, "?");
}

/* ------------------------------------------------------------------ control channel */

static void hex(const unsigned char *b, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[b[i] >> 4];
        out[2 * i + 1] = digits[b[i] & 15];
    }
    out[2 * n] = '\0';
}

static long ms_since(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (t1.tv_sec - t0->tv_sec) * 1000 + (t1.tv_nsec - t0->tv_nsec) / 1000000;
}

/* A connected (blocking) control socket, or -1. Non-blocking connect: a front out of fds
 * cannot accept, its backlog fills, and a blocking connect would then wait forever; EAGAIN is
 * tried again until the timeout. */
static int ctl_open(const struct timespec *t0, int timeout_ms)
{
    REAL(connect);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s < 0)
        return -1;
    struct sockaddr_un un;
    memset(&un, 0, sizeof un);
    un.sun_family = AF_UNIX;
    memcpy(un.sun_path, cfg.ctl, sizeof cfg.ctl);
    while (real_connect(s, (struct sockaddr *)&un, sizeof un) < 0) {
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN || ms_since(t0) >= timeout_ms) {
            close(s);
            return -1;
        }
        poll(NULL, 0, 2);
    }
    fcntl(s, F_SETFL, fcntl(s, F_GETFL) & ~O_NONBLOCK);
    return s;
}

static int ctl_send(int s, const char *req)
{
    size_t len = strlen(req), off = 0;
    while (off < len) {
        ssize_t w = send(s, req + off, len - off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        off += (size_t)w;
    }
    return 0;
}

/* One answer line (newline cut off) within timeout_ms of t0: its length, or -1. `up`: where
 * the socket the front may attach to it goes (-1: none); NULL: none wanted (closed). */
static int ctl_read(int s, char *resp, size_t resp_size, const struct timespec *t0,
                    int timeout_ms, int *up)
{
    int got_fd = -1, ret = -1;
    size_t got = 0;
    for (;;) {
        long el = ms_since(t0);
        if (el >= timeout_ms)
            break;
        struct pollfd pf = {.fd = s, .events = POLLIN};
        int r = poll(&pf, 1, (int)(timeout_ms - el));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        union {
            struct cmsghdr h;
            char buf[CMSG_SPACE(sizeof(int))];
        } c;
        struct iovec iov = {.iov_base = resp + got, .iov_len = resp_size - 1 - got};
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = c.buf,
                           .msg_controllen = sizeof c.buf};
        REAL(recvmsg);
        ssize_t n = real_recvmsg(s, &m, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        if (h != NULL && h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS &&
            h->cmsg_len == CMSG_LEN(sizeof(int)) && got_fd < 0)
            memcpy(&got_fd, CMSG_DATA(h), sizeof(int));
        got += (size_t)n;
        char *nl = memchr(resp, '\n', got);
        if (nl != NULL) {
            *nl = '\0';
            ret = (int)(nl - resp);
            break;
        }
        if (got >= resp_size - 1)
            break;
    }
    if (ret < 0 || up == NULL) {
        if (got_fd >= 0)
            close(got_fd);
        got_fd = -1;
    }
    if (up != NULL)
        *up = got_fd;
    return ret;
}

/* One request line, one answer line, on a fresh unix connection, within timeout_ms. Returns the
 * answer length (without newline) or -1. errno is preserved. */
static int ctl_request(const char *req, char *resp, size_t resp_size, int timeout_ms)
{
    int saved = errno, ret = -1;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int s = ctl_open(&t0, timeout_ms);
    if (s >= 0) {
        if (ctl_send(s, req) == 0)
            ret = ctl_read(s, resp, resp_size, &t0, timeout_ms, NULL);
        close(s);
    }
    errno = saved;
    return ret;
}

/* A name fit to be sent in a control line and to be faked. */
static int fakeable_name(const char *name)
{
    if (name == NULL || *name == '\0' || strlen(name) > 253)
        return 0;
    for (const char *p = name; *p; p++)
        if (*p <= ' ' || *p >= 127)
            return 0;
    unsigned char tmp[16];
    struct in_addr ia;
    if (inet_pton(AF_INET6, name, tmp) == 1 || inet_aton(name, &ia) != 0)
        return 0; /* numeric strings are never faked */
    return 1;
}

/* One "<op> NAME" -> "A <ipv4>" exchange with the front; 0 and ip4 filled on an answer. */
static int ask_front_addr(char op, const char *name, int timeout_ms, unsigned char ip4[4])
{
    if (!shim_active() || !fakeable_name(name))
        return -1;
    char req[300], resp[128];
    snprintf(req, sizeof req, "%c %s\n", op, name);
    if (ctl_request(req, resp, sizeof resp, timeout_ms) < 2 || resp[0] != 'A')
        return -1;
    struct in_addr ia;
    if (inet_pton(AF_INET, resp + 2, &ia) != 1)
        return -1;
    memcpy(ip4, &ia, 4);
    return 0;
}

/* Ask the front for an address for a name the host resolver could not answer. */
static int fake_lookup(const char *name, unsigned char ip4[4])
{
    return ask_front_addr('F', name, 15000, ip4);
}

/* A name already in the session's fake table (the host resolver failed on it before, in this
 * or another process): answer at once instead of waiting for the host resolver again, which
 * on a node without working DNS costs its full timeout on every lookup. */
static int known_fake(const char *name, unsigned char ip4[4])
{
    return ask_front_addr('K', name, 2000, ip4);
}

/* The IPv4 address in an AF_INET or v4-mapped AF_INET6 address, or NULL. */
static const unsigned char *ipv4_of(const void *addr, int family)
{
    if (family == AF_INET)
        return addr;
    if (family == AF_INET6 && memcmp(addr, v4mapped_prefix, 12) == 0)
        return (const unsigned char *)addr + 12;
    return NULL;
}

/* The name behind a fake IP (IPv4 or v4-mapped), or -1. */
static int fake_reverse(const void *addr, int family, char *name, size_t n)
{
    const unsigned char *a = ipv4_of(addr, family);
    if (!shim_active() || a == NULL || !is_fake4(a))
        return -1;
    char req[64], resp[300];
    snprintf(req, sizeof req, "N %u.%u.%u.%u\n", a[0], a[1], a[2], a[3]);
    if (ctl_request(req, resp, sizeof resp, 5000) < 2 || resp[0] != 'H')
        return -1;
    if (strlen(resp + 2) + 1 > n)
        return -2;
    strcpy(name, resp + 2);
    return 0;
}

/* The host resolver's name for a real IPv4 address, asked through the front ("V"). The front
 * gives the resolver a short budget and remembers addresses it could not name: on a node whose
 * DNS server never answers, a program that looks up its peer's name (xrdcp, HTCondor and GSI
 * tools do, on every run) pays that once per address and session, not glibc's timeout times
 * its attempts (5 s x 2 by default) on every call. 0: *name; 1: no name (*again: a temporary
 * failure); -1: ask the real resolver (no front, an older one, IPv6); -2: name too long. */
static int front_reverse(const void *addr, int family, char *name, size_t n, int *again)
{
    const unsigned char *a = ipv4_of(addr, family);
    if (!shim_active() || a == NULL)
        return -1;
    char req[64], resp[300];
    snprintf(req, sizeof req, "V %u.%u.%u.%u\n", a[0], a[1], a[2], a[3]);
    if (ctl_request(req, resp, sizeof resp, 5000) < 1)
        return -1;
    if (resp[0] == 'H' && resp[1] == ' ' && resp[2] != '\0') {
        if (strlen(resp + 2) + 1 > n)
            return -2;
        strcpy(name, resp + 2);
        return 0;
    }
    if (resp[0] == 'X') {
        *again = strcmp(resp, "X again") == 0;
        return 1;
    }
    return -1; /* "E": a front without "V" */
}

/* A name for addr: a fake IP's from the front's table, else, with `via_front`, the host
 * resolver's asked through the front. Results as front_reverse's. */
static int reverse_name(const void *addr, int family, char *name, size_t n, int via_front,
                        int *again)
{
    int f = fake_reverse(addr, family, name, n);
    if (f == -1 && via_front)
        f = front_reverse(addr, family, name, n, again);
    return f;
}

/* ------------------------------------------------------------------ proxied sockets */

#define MAX_FDS 65536
enum {
    ST_NONE = 0,
    ST_PENDING = 1,
    ST_OK = 2,
    ST_DNS = 3,  /* UDP redirected to our DNS */
    ST_FRONT = 4, /* the program's own connection to the front (ALL_PROXY): its peer is real */
    ST_HANDED = 5 /* connected, and the fd is the front's upstream socket now (see take_over) */
};

/* Per-fd memory of proxied sockets; validated by the socket's inode and local port so that an
 * fd closed behind our back (close_range, raw syscalls) and reused never inherits an entry. */
struct proxied {
    unsigned long ino;
    unsigned int claim;       /* the front's id for it (protocol 1) */
    unsigned char tok[16];    /* its token: the id in protocol 2 */
    unsigned short lport;
    unsigned char state;
    unsigned char listener; /* 4 or 6 */
    int old_lowat;
    long pad; /* readiness padding written by connect() */
    socklen_t orig_len;
    struct sockaddr_in6 orig; /* what the program passed to connect() (fits sockaddr_in too) */
};
static struct proxied table[MAX_FDS];

static unsigned long fd_inode(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 ? (unsigned long)st.st_ino : 0;
}

static unsigned short local_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t l = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &l) < 0)
        return 0;
    if (ss.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    if (ss.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return 0;
}

static struct proxied *lookup(int fd)
{
    if (fd < 0 || fd >= MAX_FDS || table[fd].state == ST_NONE)
        return NULL;
    struct proxied *p = &table[fd];
    if (p->ino != fd_inode(fd) || p->lport != local_port(fd)) {
        p->state = ST_NONE;
        return NULL;
    }
    return p;
}

/*
 * Handing over (front protocol 2, and NSVPN_FRONT_HANDOFF >= 1: an upstream that dials plain TCP
 * sockets, so that no connection asks in vain). When the front dialled a plain TCP socket (a
 * SOCKS5 proxy reached over TCP, e.g. an ssh -D on a TCP port; a direct host), the program's
 * socket can *become* that socket: the front sends it over the control channel
 * (SCM_RIGHTS) and this shim dup3()s it over the program's fd. The front is then out of the
 * data path: the kernel moves the bytes, as with proxychains, and nsvpn spends no CPU on the
 * flow. It happens where the program cannot be looking: inside a blocking connect() ("C h"),
 * or, for a non-blocking one, at its first getsockopt(SO_ERROR)/getpeername() after success
 * ("G"), and only while nothing has gone through the front yet (the front checks its side, this
 * shim that the program wrote nothing past the padding). A socket in an epoll set (event loops:
 * XrdCl, asyncio, libevent) keeps its registration: it belongs to the old socket, so the shim
 * deletes it and adds it back for the new one with the same events and data, as the kernel
 * lists them in /proc/self/fdinfo (a kernel too old to name the socket there leaves such
 * sockets relayed). That happens under a lock that epoll_ctl() on a proxied fd also
 * takes, so that another thread never finds the fd missing; one that sits in epoll_wait()
 * loses nothing, since adding a registration checks the socket's readiness. An AF_INET6
 * socket that also reaches IPv4 gets an AF_INET6 upstream socket (the front dials an IPv4
 * proxy v4-mapped; NSVPN_FRONT_HANDOFF=2). Still relayed: a socket in more than one epoll set
 * or registered by another process (after fork); a one-shot registration that already fired
 * (adding it back would arm EPOLLERR|EPOLLHUP); blocking connects of registered sockets;
 * IPv6-only sockets; unix-socket upstreams (nsvpn's own ssh). The options a program sets
 * before connect() are copied over; its buffer sizes are not (the new socket's are autotuned).
 * Trade-off: getsockname() shows the upstream connection's local address, and after an exec
 * getpeername() shows the proxy, not the destination.
 */
/* Where each fd is registered with epoll_ctl in this process image, as far as this shim saw:
 * ep is the epoll fd + 1 (0: in no set, -1: in several, ino then names the socket), pid the
 * process that added it (a registration inherited through fork is not ours to move). Entries
 * go stale when an fd is closed and reused: a handover checks the kernel's own list first
 * (epoll_find), and a second set is believed only when the kernel lists the first one too. */
struct epreg {
    int ep;
    int pid;
    unsigned long ino;
};
static struct epreg epreg[MAX_FDS];
/* Held through each handover (from the checks to the end of the swap), and by epoll_ctl() on
 * proxied fds, so that no registration changes in between. The holder's
 * pid, 0 when free: a holder with another pid is a thread that did not survive fork, and its
 * lock is taken over. Nothing that holds it calls epoll_ctl(), but a signal handler might:
 * the holding thread then goes through (ep_lock_mine). */
static int ep_lock_pid;
static __thread int ep_lock_mine;

static void ep_lock(void)
{
    int me = (int)getpid();
    for (;;) {
        int h = 0;
        if (__atomic_compare_exchange_n(&ep_lock_pid, &h, me, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED))
            return;
        if (h != me && __atomic_compare_exchange_n(&ep_lock_pid, &h, me, 0, __ATOMIC_ACQUIRE,
                                                   __ATOMIC_RELAXED))
            return;
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
    }
}

static void ep_unlock(void)
{
    __atomic_store_n(&ep_lock_pid, 0, __ATOMIC_RELEASE);
}

static long long bytes_acked(int fd);
static int epoll_find(int epfd, int fd, unsigned long ino, struct epoll_event *ev);

EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    REAL(epoll_ctl);
    if (fd < 0 || fd >= MAX_FDS)
        return real_epoll_ctl(epfd, op, fd, ev);
    /* a proxied socket may be changing under a handover: wait for it to finish */
    unsigned char st = __atomic_load_n(&table[fd].state, __ATOMIC_RELAXED);
    int locked = (st == ST_PENDING || st == ST_OK) && !ep_lock_mine;
    if (locked)
        ep_lock();
    int r = real_epoll_ctl(epfd, op, fd, ev);
    int e = errno;
    if (r == 0 && (op == EPOLL_CTL_ADD || op == EPOLL_CTL_DEL)) {
        struct epreg *g = &epreg[fd];
        int me = (int)getpid();
        if (op == EPOLL_CTL_ADD) {
            if (g->ep == 0 || g->pid != me) {
                g->ep = epfd + 1;
                g->pid = me;
            } else if (g->ep != epfd + 1) {
                unsigned long ino = fd_inode(fd);
                struct epoll_event old;
                if (g->ep > 0 ? epoll_find(g->ep - 1, fd, ino, &old) : g->ino == ino) {
                    g->ep = -1;
                    g->ino = ino;
                } else {
                    g->ep = epfd + 1;
                }
            }
        } else if (g->pid == me && g->ep == epfd + 1) {
            g->ep = 0;
        }
    }
    if (locked)
        ep_unlock();
    errno = e;
    return r;
}

/* The registration of (fd, the socket with inode ino) in epoll set epfd, as the kernel lists it
 * in /proc/self/fdinfo/<epfd> ("tfd: <fd> events: <hex> data: <hex> ... ino:<hex> ..."): 1 and
 * *ev, or 0 when it is not there (or cannot be read). */
static int epoll_find(int epfd, int fd, unsigned long ino, struct epoll_event *ev)
{
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", epfd);
    int f = open(path, O_RDONLY | O_CLOEXEC);
    if (f < 0)
        return 0;
    int found = 0;
    size_t have = 0;
    for (;;) {
        ssize_t n = read(f, buf + have, sizeof buf - 1 - have);
        if (n <= 0)
            break;
        have += (size_t)n;
        buf[have] = 0;
        char *line = buf, *nl;
        while ((nl = strchr(line, '\n')) != NULL) {
            *nl = 0;
            int tfd;
            unsigned int events;
            unsigned long long data;
            unsigned long lino;
            char *i = strstr(line, " ino:");
            if (i != NULL && sscanf(line, "tfd: %d events: %x data: %llx", &tfd, &events,
                                    &data) == 3 &&
                sscanf(i, " ino:%lx", &lino) == 1 && tfd == fd && lino == ino) {
                ev->events = events;
                ev->data.u64 = data;
                found = 1;
                break;
            }
            line = nl + 1;
        }
        if (found)
            break;
        have = (size_t)(buf + have - line);
        if (have == sizeof buf - 1)
            have = 0; /* a line longer than any the kernel writes: skip it */
        memmove(buf, line, have);
    }
    close(f);
    return found;
}

/* The family a handed-over socket keeps for this fd, or 0: AF_INET, and with
 * NSVPN_FRONT_HANDOFF=2 AF_INET6 unless IPv6-only (the front dials it v4-mapped: `C A`). */
static int handoff_family(int fd)
{
    int domain = 0, v6only = 1;
    socklen_t l = sizeof domain;
    REAL(getsockopt);
    if (real_getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &l) != 0)
        return 0;
    if (domain == AF_INET)
        return AF_INET;
    l = sizeof v6only;
    return domain == AF_INET6 && cfg.handoff >= 2 &&
                   real_getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &l) == 0 && !v6only
               ? AF_INET6
               : 0;
}

/* The family the fd's socket keeps when handed over (see handoff_family), or 0 when it may
 * not be; with *epfd the epoll set it must move in (-1: none), its registration in *ev.
 * Callers that may move one hold ep_lock. */
static int may_hand_over_ep(int fd, int *epfd, struct epoll_event *ev)
{
    *epfd = -1;
    if (!cfg.handoff || fd < 0 || fd >= MAX_FDS)
        return 0;
    int family = handoff_family(fd);
    if (family == 0)
        return 0;
    struct epreg g = epreg[fd];
    if (g.ep == 0)
        return family;
    if (ev == NULL || g.ep < 0 || g.pid != (int)getpid() ||
        !epoll_find(g.ep - 1, fd, fd_inode(fd), ev))
        return 0;
    /* A one-shot registration that fired cannot be put back as it is: adding one always arms
     * EPOLLERR|EPOLLHUP, which could wake a second thread while the first still handles it. */
    if ((ev->events & EPOLLONESHOT) &&
        !(ev->events & ~(unsigned)(EPOLLONESHOT | EPOLLET | EPOLLWAKEUP | EPOLLEXCLUSIVE)))
        return 0;
    *epfd = g.ep - 1;
    return family;
}

/* For a blocking connect (only sockets in no epoll set): as may_hand_over_ep. */
static int may_hand_over(int fd)
{
    int epfd;
    return may_hand_over_ep(fd, &epfd, NULL);
}

/* The program's fd becomes `up` (consumed): its options, file status flags and close-on-exec
 * carried over, TCP_NOTSENT_LOWAT set to `lowat` (the program's own). 0, or -1 (up closed). */
static int take_over(int fd, int up, struct proxied *p, int lowat)
{
    static const int opts[][2] = {
        {SOL_SOCKET, SO_KEEPALIVE},     {SOL_SOCKET, SO_LINGER},       {SOL_SOCKET, SO_RCVTIMEO},
        {SOL_SOCKET, SO_SNDTIMEO},      {SOL_SOCKET, SO_OOBINLINE},    {SOL_SOCKET, SO_PRIORITY},
        {SOL_SOCKET, SO_RCVLOWAT},      {IPPROTO_TCP, TCP_NODELAY},    {IPPROTO_TCP, TCP_KEEPIDLE},
        {IPPROTO_TCP, TCP_KEEPINTVL},   {IPPROTO_TCP, TCP_KEEPCNT},    {IPPROTO_TCP, TCP_CORK},
        {IPPROTO_TCP, TCP_USER_TIMEOUT}, {IPPROTO_TCP, TCP_CONGESTION}, {IPPROTO_IP, IP_TOS},
        {IPPROTO_IP, IP_TTL},           {IPPROTO_IPV6, IPV6_TCLASS},
        {IPPROTO_IPV6, IPV6_UNICAST_HOPS},
    };
    REAL(getsockopt);
    for (size_t i = 0; i < sizeof opts / sizeof opts[0]; i++) {
        unsigned char v[64];
        socklen_t l = sizeof v;
        if (real_getsockopt(fd, opts[i][0], opts[i][1], v, &l) == 0)
            setsockopt(up, opts[i][0], opts[i][1], v, l);
    }
    setsockopt(up, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof lowat);
    int fl = fcntl(fd, F_GETFL), fdfl = fcntl(fd, F_GETFD);
    if (fl < 0 || fdfl < 0 || fcntl(up, F_SETFL, fl) < 0 ||
        dup3(up, fd, (fdfl & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0) {
        close(up);
        return -1;
    }
    close(up);
    if (p != NULL) {
        p->ino = fd_inode(fd);
        p->lport = local_port(fd);
        p->state = ST_HANDED;
    }
    return 0;
}

/* Non-blocking connect, now standing: take the upstream socket over if the front still offers
 * it ("G"). Only when the program has written nothing yet (all it ever queued is the
 * padding). This runs inside the program's getsockopt(SO_ERROR), often in an event loop, so it
 * waits for the front briefly: an idle front answers within a fraction of a millisecond. No
 * answer in time: shutdown(SHUT_RD) makes any later answer fail on the front's side (EPIPE,
 * and the front goes on relaying), while an answer queued before it is still read here, so a
 * socket is never lost in between. After such a miss the front is busy: connections are left
 * relayed for a while instead of each paying the wait. */
#define HANDOFF_WAIT_MS 5
#define HANDOFF_BACKOFF_MS 200
static long long handoff_missed_ms = -HANDOFF_BACKOFF_MS; /* CLOCK_MONOTONIC, in ms */

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void ask_for_upstream_locked(int fd, struct proxied *p);

static void ask_for_upstream(int fd, struct proxied *p)
{
    if (!cfg.handoff ||
        now_ms() - __atomic_load_n(&handoff_missed_ms, __ATOMIC_RELAXED) < HANDOFF_BACKOFF_MS)
        return;
    ep_lock();
    ep_lock_mine = 1;
    ask_for_upstream_locked(fd, p);
    ep_lock_mine = 0;
    ep_unlock();
}

static void ask_for_upstream_locked(int fd, struct proxied *p)
{
    int outq = -1; /* sent but not acknowledged, plus unsent */
    int epfd;
    struct epoll_event ev = {0};
    if (!may_hand_over_ep(fd, &epfd, &ev) || ioctl(fd, SIOCOUTQ, &outq) != 0 || outq < 0 ||
        bytes_acked(fd) + outq != p->pad)
        return;
    char req[48], resp[16], tokhex[33];
    hex(p->tok, 16, tokhex);
    snprintf(req, sizeof req, "G %s\n", tokhex);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int s = ctl_open(&t0, HANDOFF_WAIT_MS);
    if (s < 0 || ctl_send(s, req) < 0) {
        if (s >= 0)
            close(s);
        __atomic_store_n(&handoff_missed_ms, now_ms(), __ATOMIC_RELAXED);
        return;
    }
    int up = -1;
    int n = ctl_read(s, resp, sizeof resp, &t0, HANDOFF_WAIT_MS, &up);
    if (n < 0) {
        __atomic_store_n(&handoff_missed_ms, now_ms(), __ATOMIC_RELAXED);
        shutdown(s, SHUT_RD);
        clock_gettime(CLOCK_MONOTONIC, &t0);
        n = ctl_read(s, resp, sizeof resp, &t0, 1000, &up); /* returns at once now */
    }
    close(s);
    if (n >= 1 && resp[0] == 'H' && up >= 0) {
        /* the registration belongs to the old socket: off before, back on after (also when
         * take_over failed: the old socket is reset, and the program must hear of it) */
        if (epfd >= 0)
            real_epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev);
        take_over(fd, up, p, p->old_lowat);
        if (epfd >= 0 && real_epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
            shim_log("fd %d lost its epoll registration when its socket was handed over: %s",
                     fd, strerror(errno));
    } else if (up >= 0) {
        close(up);
    }
}

static int unsent_bytes(int fd)
{
    int n = 0;
    return ioctl(fd, SIOCOUTQNSD, &n) == 0 ? n : -1;
}

/* Data bytes of this connection the peer acknowledged, or -1: tcp_info.tcpi_bytes_acked
 * (Linux >= 4.1; the struct only ever grows, so the offset is stable), in which the SYN counts
 * as one byte. */
#define TCPI_BYTES_ACKED_OFFSET 120
static long long bytes_acked(int fd)
{
    unsigned char info[256];
    socklen_t l = sizeof info;
    unsigned long long v;
    REAL(getsockopt);
    if (real_getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &l) < 0 ||
        l < TCPI_BYTES_ACKED_OFFSET + sizeof v)
        return -1;
    memcpy(&v, info + TCPI_BYTES_ACKED_OFFSET, sizeof v);
    return v > 0 ? (long long)v - 1 : 0;
}

static int claim_answer(const struct proxied *p);
static void ask_for_upstream(int fd, struct proxied *p);

/* Pending -> connected once the front let the padding through (the upstream is connected):
 * no unsent bytes left, or all padding acknowledged; when the program wrote more since and the
 * last ACK is still on its way, the front itself says whether the claim succeeded. */
static int settle(int fd, struct proxied *p)
{
    if (p->state != ST_PENDING)
        return 0;
    if (unsent_bytes(fd) != 0 && bytes_acked(fd) < p->pad && claim_answer(p) != 0)
        return -1;
    int v = p->old_lowat;
    setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &v, sizeof v);
    p->state = ST_OK;
    ask_for_upstream(fd, p);
    return 0;
}

/* "S <id>" for this claim. */
static void status_request(const struct proxied *p, char *req, size_t n)
{
    if (cfg.proto >= 2) {
        char tokhex[33];
        hex(p->tok, 16, tokhex);
        snprintf(req, n, "S %s\n", tokhex);
    } else {
        snprintf(req, n, "S %u\n", p->claim);
    }
}

/* The front's answer for a claim: 0 connected, an errno, or -1 while still dialling. */
static int claim_answer(const struct proxied *p)
{
    char req[48], resp[64];
    status_request(p, req, sizeof req);
    if (ctl_request(req, resp, sizeof resp, 5000) >= 3 && resp[0] == 'R')
        return atoi(resp + 2);
    return -1;
}

/* The front's verdict about a reset claim (the errno of the upstream's answer). */
static int claim_verdict(const struct proxied *p, int fallback)
{
    char req[48], resp[64];
    status_request(p, req, sizeof req);
    if (ctl_request(req, resp, sizeof resp, 5000) >= 3 && resp[0] == 'R') {
        int e = atoi(resp + 2);
        if (e > 0)
            return e;
    }
    return fallback;
}

static int front_address(int fd, int family, struct sockaddr_in6 *out, socklen_t *len,
                         unsigned char *listener)
{
    memset(out, 0, sizeof *out);
    if (family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)out;
        in->sin_family = AF_INET;
        in->sin_port = htons(cfg.port4);
        in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        *len = sizeof *in;
        *listener = 4;
        return 0;
    }
    int v6only = 0;
    socklen_t l = sizeof v6only;
    REAL(getsockopt);
    real_getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &l);
    out->sin6_family = AF_INET6;
    *len = sizeof *out;
    if (!v6only) {
        out->sin6_port = htons(cfg.port4);
        memcpy(out->sin6_addr.s6_addr, v4mapped_prefix, 12);
        out->sin6_addr.s6_addr[12] = 127;
        out->sin6_addr.s6_addr[15] = 1;
        *listener = 4;
        return 0;
    }
    if (cfg.port6 == 0)
        return -1;
    out->sin6_port = htons(cfg.port6);
    out->sin6_addr = in6addr_loopback;
    *listener = 6;
    return 0;
}

static int make_token(unsigned char tok[16])
{
    long n = syscall(SYS_getrandom, tok, 16, 0);
    if (n != 16) {
        int f = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
        if (f < 0)
            return -1;
        n = read(f, tok, 16);
        close(f);
        if (n != 16)
            return -1;
    }
    tok[0] = 0; /* marks "shim connection" to the front (a SOCKS5 greeting starts with 5) */
    return 0;
}

static int send_all(int fd, const void *buf, size_t n)
{
    const char *b = buf;
    while (n > 0) {
        ssize_t w = send(fd, b, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        b += w;
        n -= (size_t)w;
    }
    return 0;
}

static int wait_fd(int fd, short ev, int ms)
{
    struct pollfd p = {.fd = fd, .events = ev};
    for (;;) {
        int r = poll(&p, 1, ms);
        if (r < 0 && errno == EINTR)
            continue;
        return r;
    }
}

/*
 * Fill the front's receive window so that bytes stay unsent: with NOTSENT_LOWAT=1 the socket
 * is then not writable until the front drains them. Returns the bytes written (the padding
 * length the front must drop), or -1.
 *
 * The unsent part must outlast any later growth of the front's window (the receiver's window
 * keeps opening a little for a while after it first closed; the front's small locked buffer
 * bounds that growth to a few KB): at least MIN_UNSENT bytes are left waiting. NOTSENT_LOWAT=1
 * is set only afterwards, since with it set a send stops at the first unsent byte.
 */
#define MIN_UNSENT (32 * 1024)
static long stuff_window(int fd, const unsigned char tok[16], int *old_lowat)
{
    static const char zeros[16384];
    int one = 1, old_nodelay = 0;
    socklen_t l = sizeof old_nodelay;
    real_getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &old_nodelay, &l);
    l = sizeof *old_lowat;
    *old_lowat = 0;
    real_getsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, old_lowat, &l);
    long total = 0;
    ssize_t w;
    do
        w = send(fd, tok, 16, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (w < 0 && errno == EINTR);
    if (w != 16)
        return -1;
    total = 16;
    /* Nagle would hold small segments back for a moment: "unsent" must mean "window full". */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int idle = 0;
    while (total < (16L << 20) && unsent_bytes(fd) < MIN_UNSENT) {
        w = send(fd, zeros, sizeof zeros, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            total += w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (unsent_bytes(fd) > 0)
                break; /* the send buffer is full of bytes that wait for the front */
            /* send buffer full of in-flight bytes (tiny SO_SNDBUF): wait for ACKs */
            if (++idle > 200)
                break;
            wait_fd(fd, POLLOUT, 5);
            continue;
        }
        return -1;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &old_nodelay, sizeof old_nodelay);
    /* No TCP_NOTSENT_LOWAT (kernel < 3.12): no readiness gate, the bytes still flow right;
     * only a failure shows up as a reset instead of its errno. */
    setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &one, sizeof one);
    return total;
}

/* How long a connect may wait for the front's verdict: SO_SNDTIMEO bounds it as in the kernel
 * (EINPROGRESS when it expires; the dial goes on); the front's dial is bounded (its connect
 * timeout), so the cap is a safety net only. */
static int verdict_limit_ms(int fd)
{
    struct timeval tv = {0, 0};
    socklen_t tl = sizeof tv;
    if (real_getsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, &tl) == 0 &&
        (tv.tv_sec > 0 || tv.tv_usec > 0) && tv.tv_sec < 300)
        return (int)(tv.tv_sec * 1000 + (tv.tv_usec + 999) / 1000);
    return 300000;
}

/* The front's "R <errno>" on control socket `s` (closed here): 0 (connected) or -1 with the
 * upstream's errno. `fd` >= 0: the front may send its upstream socket with "R 0" ("C h"), and
 * the program's fd becomes it. Signals do not interrupt the wait (as if SA_RESTART). */
static int await_verdict(int s, int fd, struct proxied *p, const struct timespec *t0, int limit,
                         const char *host, unsigned short port)
{
    char resp[64];
    int up = -1;
    int n = s < 0 ? -1 : ctl_read(s, resp, sizeof resp, t0, limit, fd >= 0 ? &up : NULL);
    if (s >= 0)
        close(s);
    if (n < 3 || resp[0] != 'R') {
        if (up >= 0)
            close(up);
        if (limit < 300000 && ms_since(t0) >= limit) {
            errno = EINPROGRESS;
            return -1;
        }
        shim_log("no answer from the nsvpn front for %s port %u", host, port);
        errno = ECONNABORTED;
        return -1;
    }
    int e = atoi(resp + 2);
    if (e != 0) {
        if (up >= 0)
            close(up);
        errno = e;
        return -1;
    }
    if (p != NULL)
        p->state = ST_OK;
    if (up >= 0) {
        int lowat = 0;
        socklen_t l = sizeof lowat;
        real_getsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, &l);
        if (take_over(fd, up, p, lowat) < 0) {
            errno = ECONNABORTED; /* the front let go of the connection: it is lost */
            return -1;
        }
    }
    return 0;
}

/* Claim the connection (the front drops `pad` bytes, token included) and wait for the
 * upstream's outcome: 0 (connected) or -1 with its errno. */
static int claim_and_wait(int fd, struct proxied *p, unsigned char listener, unsigned short lport,
                          long pad, const char *tokhex, const char *host, unsigned short port)
{
    char req[200];
    int limit = verdict_limit_ms(fd);
    /* with SO_SNDTIMEO this connect may stop waiting, and a socket sent then would be lost */
    int family = limit == 300000 ? may_hand_over(fd) : 0;
    char mode = family == 0 ? 'b' : family == AF_INET6 ? 'H' : 'h';
    snprintf(req, sizeof req, "C %c %u %u %ld %s %s %u\n", mode, listener, lport, pad, tokhex,
             host, port);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int s = ctl_open(&t0, limit);
    if (s >= 0 && ctl_send(s, req) < 0) {
        close(s);
        s = -1;
    }
    return await_verdict(s, family != 0 ? fd : -1, p, &t0, limit, host, port);
}

/*
 * Non-blocking connect with a protocol-2 front: pad, then send the claim and its padding length
 * ("L <pad>") in one write and return EINPROGRESS without an answer, so connect() never waits
 * for the front (a busy front used to stall event loops for up to 15 s per connect). The token
 * names the claim for later "S" requests. When the padding could not be left unsent (see the
 * protocol-1 path in proxy_connect) nothing gates readiness: "W <pad>" asks for the verdict on
 * that connection instead, and connect() waits for it as a blocking one does.
 * (Sending the claim before the padding, which the front also accepts, was measured: no gain.)
 */
static int claim_nowait(int fd, struct proxied *p, unsigned char listener, unsigned short lport,
                       const unsigned char tok[16], const char *tokhex, const char *host,
                       unsigned short port)
{
    char req[240];
    struct timespec t0;
    int old_lowat = 0;
    long pad = stuff_window(fd, tok, &old_lowat);
    if (pad < 0) {
        errno = ECONNABORTED;
        return -1;
    }
    int gated = unsent_bytes(fd) > 0;
    if (!gated)
        setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &old_lowat, sizeof old_lowat);
    /* 'A': the program's socket is AF_INET6 and could take an AF_INET6 upstream socket */
    char mode = handoff_family(fd) == AF_INET6 ? 'A' : 'a';
    snprintf(req, sizeof req, "C %c %u %u - %s %s %u\n%c %ld\n", mode, listener, lport, tokhex,
             host, port, gated ? 'L' : 'W', pad);
    int limit = gated ? 15000 : verdict_limit_ms(fd);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int s = ctl_open(&t0, limit);
    if (s >= 0 && ctl_send(s, req) < 0) {
        close(s);
        s = -1;
    }
    if (!gated)
        return await_verdict(s, -1, p, &t0, limit, host, port);
    if (s < 0) {
        shim_log("no answer from the nsvpn front for %s port %u", host, port);
        errno = ECONNABORTED;
        return -1;
    }
    close(s);
    if (p != NULL) {
        memcpy(p->tok, tok, 16);
        p->old_lowat = old_lowat;
        p->pad = pad;
        p->state = ST_PENDING;
    }
    errno = EINPROGRESS;
    return -1;
}

static int proxy_connect(int fd, int sock_family, const struct sockaddr *sa, socklen_t salen,
                         const struct dest *d)
{
    struct sockaddr_in6 front;
    socklen_t flen;
    unsigned char listener;
    if (front_address(fd, sock_family, &front, &flen, &listener) < 0) {
        shim_log("IPv6-only socket and no IPv6 loopback front: cannot proxy");
        errno = ENETUNREACH;
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    int nonblock = fl >= 0 && (fl & O_NONBLOCK);
    int r = real_connect(fd, (struct sockaddr *)&front, flen);
    if (r < 0 && errno == EINPROGRESS) {
        /* loopback: the handshake completes within microseconds */
        if (wait_fd(fd, POLLOUT, 5000) <= 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        int err = 0;
        socklen_t l = sizeof err;
        real_getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l);
        r = err ? -1 : 0;
        if (err)
            errno = err;
    }
    if (r < 0) {
        if (errno == ECONNREFUSED) {
            shim_log("the nsvpn front is not running (is nsvpn still up?)");
            errno = ENETUNREACH;
        }
        return -1;
    }
    unsigned short lport = local_port(fd);
    unsigned char tok[16];
    char tokhex[33], host[INET6_ADDRSTRLEN], req[200], resp[64];
    if (make_token(tok) < 0) {
        errno = ECONNABORTED;
        return -1;
    }
    hex(tok, 16, tokhex);
    dest_text(d, host, sizeof host);

    struct proxied *p = (fd < MAX_FDS) ? &table[fd] : NULL;
    if (p != NULL) {
        p->state = ST_NONE;
        p->ino = fd_inode(fd);
        p->lport = lport;
        p->listener = listener;
        p->orig_len = salen < sizeof p->orig ? salen : (socklen_t)sizeof p->orig;
        memcpy(&p->orig, sa, p->orig_len);
        p->old_lowat = 0;
    }

    if (!nonblock) {
        if (send_all(fd, tok, 16) < 0)
            return -1;
        return claim_and_wait(fd, p, listener, lport, 16, tokhex, host, d->port);
    }

    if (cfg.proto >= 2)
        return claim_nowait(fd, p, listener, lport, tok, tokhex, host, d->port);

    int old_lowat = 0;
    long pad = stuff_window(fd, tok, &old_lowat);
    if (pad < 0) {
        errno = ECONNABORTED;
        return -1;
    }
    if (unsent_bytes(fd) <= 0) {
        /* The padding could not be left waiting (the kernel would not queue more: seen with
         * ~1000 connects at once), so nothing gates readiness: the socket would look
         * connected before the upstream is. Wait for the front's answer here instead, as a
         * blocking connect does; connect() then returns 0 or the upstream's errno. */
        setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &old_lowat, sizeof old_lowat);
        return claim_and_wait(fd, p, listener, lport, pad, tokhex, host, d->port);
    }
    snprintf(req, sizeof req, "C a %u %u %ld %s %s %u\n", listener, lport, pad, tokhex, host,
             d->port);
    if (ctl_request(req, resp, sizeof resp, 15000) < 3 || resp[0] != 'K') {
        shim_log("no answer from the nsvpn front for %s port %u", host, d->port);
        errno = ECONNABORTED;
        return -1;
    }
    if (p != NULL) {
        p->claim = (unsigned int)strtoul(resp + 2, NULL, 10);
        p->old_lowat = old_lowat;
        p->pad = pad;
        p->state = ST_PENDING;
    }
    errno = EINPROGRESS;
    return -1;
}

static int socket_type(int fd)
{
    int type = 0;
    socklen_t l = sizeof type;
    REAL(getsockopt);
    if (real_getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l) < 0)
        return -1;
    return type;
}

static int socket_family(int fd)
{
    struct sockaddr_storage ss;
    socklen_t l = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &l) < 0)
        return -1;
    return ss.ss_family;
}

static void log_udp(const struct dest *d)
{
    char host[INET6_ADDRSTRLEN];
    dest_text(d, host, sizeof host);
    shim_log("UDP to %s port %u is not carried by the tunnel (preload mode): ENETUNREACH", host,
             d->port);
}

static void copy_out(struct sockaddr *sa, socklen_t *len, const void *src, socklen_t srclen)
{
    memcpy(sa, src, *len < srclen ? *len : srclen);
    *len = srclen;
}

/* The front's DNS responder, in the address family of the socket that will talk to it. */
static int dns_address(int fd, int family, struct sockaddr_in6 *out, socklen_t *len)
{
    memset(out, 0, sizeof *out);
    if (family == AF_INET) {
        if (cfg.dns4 == 0)
            return -1;
        struct sockaddr_in *in = (struct sockaddr_in *)out;
        in->sin_family = AF_INET;
        in->sin_port = htons(cfg.dns4);
        in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        *len = sizeof *in;
        return 0;
    }
    int v6only = 0;
    socklen_t l = sizeof v6only;
    REAL(getsockopt);
    real_getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &l);
    out->sin6_family = AF_INET6;
    *len = sizeof *out;
    if (!v6only && cfg.dns4 != 0) {
        out->sin6_port = htons(cfg.dns4);
        memcpy(out->sin6_addr.s6_addr, v4mapped_prefix, 12);
        out->sin6_addr.s6_addr[12] = 127;
        out->sin6_addr.s6_addr[15] = 1;
        return 0;
    }
    if (cfg.dns6 == 0)
        return -1;
    out->sin6_port = htons(cfg.dns6);
    out->sin6_addr = in6addr_loopback;
    return 0;
}

static int is_dns_peer(const struct sockaddr *sa, socklen_t len)
{
    struct dest d;
    if (sa == NULL || parse_dest(sa, len, &d) < 0)
        return 0;
    if (d.family == AF_INET)
        return cfg.dns4 != 0 && d.port == cfg.dns4 && d.a[0] == 127 && d.a[1] == 0 &&
               d.a[2] == 0 && d.a[3] == 1;
    return cfg.dns6 != 0 && d.port == cfg.dns6 && memcmp(d.a, &in6addr_loopback, 16) == 0;
}

/* fd's table entry, emptied and tied to the socket now behind fd (NULL past MAX_FDS). */
static struct proxied *fresh_entry(int fd)
{
    if (fd < 0 || fd >= MAX_FDS)
        return NULL;
    struct proxied *p = &table[fd];
    p->state = ST_NONE;
    p->ino = fd_inode(fd);
    p->lport = local_port(fd);
    return p;
}

/* Remember where a redirected DNS socket meant to go: replies get that source address back. */
static void remember_dns(int fd, const struct sockaddr *sa, socklen_t len)
{
    struct proxied *p = fresh_entry(fd);
    if (p == NULL)
        return;
    p->orig_len = len < sizeof p->orig ? len : (socklen_t)sizeof p->orig;
    memcpy(&p->orig, sa, p->orig_len);
    p->state = ST_DNS;
}

static int is_front_peer(const struct sockaddr *sa, socklen_t len, unsigned char *listener);

/* A SOCKS client of the front (curl with ALL_PROXY): getpeername() then need not ask the front
 * whose connection it is (a control round trip per connection). */
static void remember_front_client(int fd)
{
    struct proxied *p = fresh_entry(fd);
    if (p != NULL)
        p->state = ST_FRONT;
}

/*
 * UDP to an address outside the direct networks: DNS (port 53) goes to the front's responder
 * (*to), anything else fails with ENETUNREACH and a line on stderr.
 * Returns 0: not ours, pass through; 1: send to *to instead; -1: refuse.
 */
static int udp_route(int fd, const struct sockaddr *sa, socklen_t len, struct sockaddr_in6 *to,
                     socklen_t *tolen)
{
    if (!shim_active() || sa == NULL ||
        (sa->sa_family != AF_INET && sa->sa_family != AF_INET6))
        return 0;
    struct dest d;
    if (parse_dest(sa, len, &d) < 0 || is_direct(&d))
        return 0;
    int saved = errno;
    int type = socket_type(fd);
    errno = saved;
    if (type != SOCK_DGRAM)
        return 0;
    if (d.port == 53 && dns_address(fd, sa->sa_family, to, tolen) == 0) {
        errno = saved;
        return 1;
    }
    log_udp(&d);
    return -1;
}

/* TCP Fast Open clients connect with sendto/sendmsg(MSG_FASTOPEN): proxy them like connect().
 * Returns 1 when fd is such a socket headed outside the direct networks (then *ret is the
 * connect outcome: 0, or -1 with errno, EINPROGRESS for a pending non-blocking socket). */
static int fastopen_connect(int fd, int flags, const struct sockaddr *sa, socklen_t len, int *ret)
{
#ifdef MSG_FASTOPEN
    if (!(flags & MSG_FASTOPEN) || !shim_active() || sa == NULL ||
        (sa->sa_family != AF_INET && sa->sa_family != AF_INET6))
        return 0;
    struct dest d;
    int saved = errno;
    if (parse_dest(sa, len, &d) < 0 || is_direct(&d) || socket_type(fd) != SOCK_STREAM) {
        errno = saved;
        return 0;
    }
    *ret = connect(fd, sa, len);
    return 1;
#else
    (void)fd, (void)flags, (void)sa, (void)len, (void)ret;
    return 0;
#endif
}

EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *sa,
                      socklen_t len)
{
    REAL(sendto);
    int cr;
    if (fastopen_connect(fd, flags, sa, len, &cr)) {
        if (cr < 0)
            return -1;
        return real_sendto(fd, buf, n, flags & ~MSG_FASTOPEN, NULL, 0);
    }
    struct sockaddr_in6 to;
    socklen_t tolen;
    int route = udp_route(fd, sa, len, &to, &tolen);
    if (route < 0) {
        errno = ENETUNREACH;
        return -1;
    }
    if (route == 0)
        return real_sendto(fd, buf, n, flags, sa, len);
    ssize_t r = real_sendto(fd, buf, n, flags, (struct sockaddr *)&to, tolen);
    if (r >= 0) {
        int saved = errno;
        remember_dns(fd, sa, len);
        errno = saved;
    }
    return r;
}

EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    REAL(sendmsg);
    if (msg == NULL)
        return real_sendmsg(fd, msg, flags);
    int cr;
    if (fastopen_connect(fd, flags, msg->msg_name, msg->msg_namelen, &cr)) {
        if (cr < 0)
            return -1;
        struct msghdr m = *msg;
        m.msg_name = NULL;
        m.msg_namelen = 0;
        return real_sendmsg(fd, &m, flags & ~MSG_FASTOPEN);
    }
    struct sockaddr_in6 to;
    socklen_t tolen;
    int route = udp_route(fd, msg->msg_name, msg->msg_namelen, &to, &tolen);
    if (route < 0) {
        errno = ENETUNREACH;
        return -1;
    }
    if (route == 0)
        return real_sendmsg(fd, msg, flags);
    struct msghdr m = *msg;
    m.msg_name = &to;
    m.msg_namelen = tolen;
    ssize_t r = real_sendmsg(fd, &m, flags);
    if (r >= 0) {
        int saved = errno;
        remember_dns(fd, msg->msg_name, msg->msg_namelen);
        errno = saved;
    }
    return r;
}

/* A reply from our DNS responder on a redirected socket: show the address the program asked. */
static void fix_source(int fd, struct sockaddr *sa, socklen_t *len)
{
    if (fd < 0 || fd >= MAX_FDS || table[fd].state != ST_DNS || sa == NULL || len == NULL ||
        !is_dns_peer(sa, *len))
        return;
    int saved = errno;
    struct proxied *p = lookup(fd);
    if (p != NULL && p->state == ST_DNS)
        copy_out(sa, len, &p->orig, p->orig_len);
    errno = saved;
}

EXPORT ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *sa,
                        socklen_t *len)
{
    REAL(recvfrom);
    ssize_t r = real_recvfrom(fd, buf, n, flags, sa, len);
    if (r >= 0 && sa != NULL)
        fix_source(fd, sa, len);
    return r;
}

EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
    REAL(recvmsg);
    ssize_t r = real_recvmsg(fd, msg, flags);
    if (r >= 0 && msg != NULL && msg->msg_name != NULL)
        fix_source(fd, msg->msg_name, &msg->msg_namelen);
    return r;
}

EXPORT int connect(int fd, const struct sockaddr *sa, socklen_t len)
{
    REAL(connect);
    if (!shim_active() || sa == NULL ||
        (sa->sa_family != AF_INET && sa->sa_family != AF_INET6))
        return real_connect(fd, sa, len);
    int saved = errno;
    struct dest d;
    int type = socket_type(fd);
    if (type < 0 || parse_dest(sa, len, &d) < 0) {
        errno = saved;
        return real_connect(fd, sa, len);
    }
    if (type == SOCK_DGRAM) {
        struct sockaddr_in6 to;
        socklen_t tolen;
        int route = udp_route(fd, sa, len, &to, &tolen);
        if (route < 0) {
            errno = ENETUNREACH;
            return -1;
        }
        errno = saved;
        if (route == 0)
            return real_connect(fd, sa, len);
        int r = real_connect(fd, (struct sockaddr *)&to, tolen);
        if (r == 0) {
            remember_dns(fd, sa, len);
            errno = saved;
        }
        return r;
    }
    if (type != SOCK_STREAM || is_direct(&d)) {
        unsigned char listener;
        errno = saved;
        int r = real_connect(fd, sa, len);
        if (type == SOCK_STREAM && (r == 0 || errno == EINPROGRESS) &&
            is_front_peer(sa, len, &listener)) {
            int e = errno;
            remember_front_client(fd);
            errno = e;
        }
        return r;
    }
    struct proxied *p = lookup(fd);
    if (p != NULL) {
        /* connect() again on a socket we already proxied: report its progress */
        if (p->state == ST_PENDING && settle(fd, p) < 0) {
            int err = 0;
            socklen_t l = sizeof err;
            real_getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l);
            if (err != 0) {
                p->state = ST_NONE;
                errno = claim_verdict(p, err);
                return -1;
            }
            errno = EALREADY;
            return -1;
        }
        errno = EISCONN;
        return -1;
    }
    int fam = socket_family(fd);
    if (fam != AF_INET && fam != AF_INET6) {
        errno = saved;
        return real_connect(fd, sa, len);
    }
    return proxy_connect(fd, fam, sa, len, &d);
}

static int is_front_peer(const struct sockaddr *sa, socklen_t len, unsigned char *listener)
{
    struct dest d;
    if (parse_dest(sa, len, &d) < 0)
        return 0;
    if (d.family == AF_INET && d.a[0] == 127 && d.a[1] == 0 && d.a[2] == 0 && d.a[3] == 1 &&
        d.port == cfg.port4) {
        *listener = 4;
        return 1;
    }
    if (d.family == AF_INET6 && cfg.port6 != 0 && d.port == cfg.port6 &&
        memcmp(d.a, &in6addr_loopback, 16) == 0) {
        *listener = 6;
        return 1;
    }
    return 0;
}


EXPORT int getpeername(int fd, struct sockaddr *sa, socklen_t *len)
{
    REAL(getpeername);
    int r = real_getpeername(fd, sa, len);
    if (r < 0 || !shim_active() || sa == NULL || len == NULL)
        return r;
    unsigned char listener;
    int saved = errno;
    if (is_dns_peer(sa, *len)) {
        fix_source(fd, sa, len);
        errno = saved;
        return r;
    }
    if (fd >= 0 && fd < MAX_FDS && table[fd].state == ST_HANDED) { /* see take_over */
        struct proxied *h = lookup(fd);
        if (h != NULL) {
            copy_out(sa, len, &h->orig, h->orig_len);
            errno = saved;
            return 0;
        }
    }
    if (!is_front_peer(sa, *len, &listener))
        return r;
    struct proxied *p = lookup(fd);
    if (p != NULL && p->state == ST_FRONT) {
        errno = saved;
        return r;
    }
    if (p != NULL) {
        if (p->state == ST_PENDING && settle(fd, p) < 0) {
            errno = ENOTCONN; /* what a socket in SYN_SENT says */
            return -1;
        }
        copy_out(sa, len, &p->orig, p->orig_len);
        errno = saved;
        return 0;
    }
    /* a socket we did not connect in this process image (exec, dup): ask the front */
    char req[48], resp[128], host[64];
    unsigned port = 0;
    snprintf(req, sizeof req, "P %u %u\n", listener, local_port(fd));
    if (ctl_request(req, resp, sizeof resp, 5000) < 3 || resp[0] != 'D' ||
        sscanf(resp + 2, "%63s %u", host, &port) != 2) {
        errno = saved;
        return r;
    }
    int fam = sa->sa_family;
    struct sockaddr_in6 out;
    memset(&out, 0, sizeof out);
    unsigned char a[16];
    if (fam == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&out;
        if (inet_pton(AF_INET, host, a) != 1) {
            errno = saved;
            return r;
        }
        in->sin_family = AF_INET;
        in->sin_port = htons((unsigned short)port);
        memcpy(&in->sin_addr, a, 4);
        copy_out(sa, len, in, sizeof *in);
    } else {
        out.sin6_family = AF_INET6;
        out.sin6_port = htons((unsigned short)port);
        if (inet_pton(AF_INET, host, a) == 1) {
            memcpy(out.sin6_addr.s6_addr, v4mapped_prefix, 12);
            memcpy(out.sin6_addr.s6_addr + 12, a, 4);
        } else if (inet_pton(AF_INET6, host, out.sin6_addr.s6_addr) != 1) {
            errno = saved;
            return r;
        }
        copy_out(sa, len, &out, sizeof out);
    }
    errno = saved;
    return 0;
}

EXPORT int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
    REAL(getsockopt);
    int r = real_getsockopt(fd, level, name, val, len);
    if (r < 0 || level != SOL_SOCKET || name != SO_ERROR || !shim_active() || val == NULL ||
        len == NULL || *len < sizeof(int))
        return r;
    if (fd < 0 || fd >= MAX_FDS || table[fd].state != ST_PENDING)
        return r;
    int saved = errno;
    struct proxied *p = lookup(fd);
    if (p == NULL) {
        errno = saved;
        return r;
    }
    int err = *(int *)val;
    if (err != 0) {
        /* the front reset the connection: report why the upstream refused it */
        *(int *)val = claim_verdict(p, err);
        p->state = ST_NONE;
    } else {
        settle(fd, p); /* still pending: 0 is what a socket in SYN_SENT says too */
    }
    errno = saved;
    return r;
}

/* ------------------------------------------------------------------ name resolution */

/* getaddrinfo results for a fake IP, built by the real getaddrinfo from the numeric string
 * (so that service, socktype and the memory layout freeaddrinfo expects are all libc's). */
static int fake_addrinfo(const char *node, const char *service, const struct addrinfo *hints,
                         int family, int flags, const unsigned char ip[4],
                         struct addrinfo **res)
{
    char text[64];
    if (family == AF_INET6)
        snprintf(text, sizeof text, "::ffff:%u.%u.%u.%u", ip[0], ip[1], ip[2], ip[3]);
    else
        snprintf(text, sizeof text, "%u.%u.%u.%u", ip[0], ip[1], ip[2], ip[3]);
    struct addrinfo h;
    memset(&h, 0, sizeof h);
    if (hints != NULL)
        h = *hints;
    h.ai_family = family;
    h.ai_flags = (flags | AI_NUMERICHOST) & ~(AI_CANONNAME | AI_ADDRCONFIG | AI_V4MAPPED | AI_ALL);
    h.ai_addr = NULL;
    h.ai_canonname = NULL;
    h.ai_next = NULL;
    struct addrinfo *out = NULL;
    if (real_getaddrinfo(text, service, &h, &out) != 0)
        return -1;
    if ((flags & AI_CANONNAME) && out != NULL) {
        char *c = strdup(node);
        if (c != NULL) {
            free(out->ai_canonname);
            out->ai_canonname = c;
        }
    }
    *res = out;
    return 0;
}

EXPORT int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                       struct addrinfo **res)
{
    REAL(getaddrinfo);
    if (!shim_active() || node == NULL || res == NULL)
        return real_getaddrinfo(node, service, hints, res);
    int family = hints ? hints->ai_family : AF_UNSPEC;
    int flags = hints ? hints->ai_flags : (AI_V4MAPPED | AI_ADDRCONFIG);
    /* fake IPs are IPv4: an IPv6-only request gets one only as v4-mapped, as glibc would */
    int eligible = !(flags & AI_NUMERICHOST) &&
                   (family == AF_UNSPEC || family == AF_INET ||
                    (family == AF_INET6 && (flags & AI_V4MAPPED))) &&
                   fakeable_name(node);
    int saved = errno;
    unsigned char ip[4];
    if (eligible && known_fake(node, ip) == 0 &&
        fake_addrinfo(node, service, hints, family, flags, ip, res) == 0) {
        errno = saved;
        return 0;
    }
    errno = saved;
    int r = real_getaddrinfo(node, service, hints, res);
    if (r == 0 || !eligible || (r != EAI_NONAME && r != EAI_AGAIN && r != EAI_FAIL))
        return r;
    saved = errno;
    if (fake_lookup(node, ip) < 0 ||
        fake_addrinfo(node, service, hints, family, flags, ip, res) != 0) {
        errno = saved;
        return r;
    }
    errno = saved;
    return 0;
}

/* Lay out a hostent for one address in buf; -1 when buf is too small. */
static int fill_hostent(const char *name, int af, const unsigned char ip4[4], struct hostent *he,
                        char *buf, size_t buflen)
{
    size_t alen = af == AF_INET6 ? 16 : 4;
    size_t nlen = strlen(name) + 1;
    uintptr_t start = (uintptr_t)buf;
    uintptr_t ptrs = (start + sizeof(char *) - 1) & ~(uintptr_t)(sizeof(char *) - 1);
    size_t need = (ptrs - start) + 3 * sizeof(char *) + 16 + nlen;
    if (buf == NULL || buflen < need)
        return -1;
    char **list = (char **)ptrs;
    unsigned char *addr = (unsigned char *)(list + 3);
    char *nm = (char *)addr + 16;
    if (af == AF_INET6) {
        memcpy(addr, v4mapped_prefix, 12);
        memcpy(addr + 12, ip4, 4);
    } else {
        memcpy(addr, ip4, 4);
    }
    memcpy(nm, name, nlen);
    list[0] = (char *)addr; /* h_addr_list = {addr, NULL} */
    list[1] = NULL;
    list[2] = NULL; /* h_aliases = {NULL} */
    he->h_name = nm;
    he->h_aliases = &list[2];
    he->h_addrtype = af;
    he->h_length = (int)alen;
    he->h_addr_list = list;
    return 0;
}

static __thread struct hostent tls_he;
static __thread char tls_buf[512];

static int fake_worthy(int herr)
{
    return herr == HOST_NOT_FOUND || herr == TRY_AGAIN || herr == NO_RECOVERY;
}

static struct hostent *fake_hostent_static(const char *name, int af, int known_only)
{
    unsigned char ip[4];
    if (af != AF_INET) /* fake IPs are IPv4 */
        return NULL;
    if ((known_only ? known_fake(name, ip) : fake_lookup(name, ip)) < 0)
        return NULL;
    if (fill_hostent(name, af, ip, &tls_he, tls_buf, sizeof tls_buf) < 0)
        return NULL;
    h_errno = 0;
    return &tls_he;
}

EXPORT struct hostent *gethostbyname(const char *name)
{
    REAL(gethostbyname);
    int saved = errno;
    struct hostent *he = shim_active() ? fake_hostent_static(name, AF_INET, 1) : NULL;
    errno = saved;
    if (he != NULL)
        return he;
    he = real_gethostbyname(name);
    if (he != NULL || !shim_active() || !fake_worthy(h_errno))
        return he;
    saved = errno;
    int herr = h_errno;
    he = fake_hostent_static(name, AF_INET, 0);
    if (he == NULL)
        h_errno = herr;
    errno = saved;
    return he;
}

EXPORT struct hostent *gethostbyname2(const char *name, int af)
{
    REAL(gethostbyname2);
    int saved = errno;
    struct hostent *he = shim_active() ? fake_hostent_static(name, af, 1) : NULL;
    errno = saved;
    if (he != NULL)
        return he;
    he = real_gethostbyname2(name, af);
    if (he != NULL || !shim_active() || !fake_worthy(h_errno))
        return he;
    saved = errno;
    int herr = h_errno;
    he = fake_hostent_static(name, af, 0);
    if (he == NULL)
        h_errno = herr;
    errno = saved;
    return he;
}

static int fake_r(const char *name, int af, struct hostent *ret, char *buf, size_t buflen,
                  struct hostent **result, int *h_errnop, int known_only)
{
    unsigned char ip[4];
    if (af != AF_INET || result == NULL) /* fake IPs are IPv4 */
        return -1;
    if ((known_only ? known_fake(name, ip) : fake_lookup(name, ip)) < 0)
        return -1;
    if (fill_hostent(name, af, ip, ret, buf, buflen) < 0) {
        *result = NULL;
        if (h_errnop)
            *h_errnop = NETDB_INTERNAL;
        return ERANGE;
    }
    *result = ret;
    if (h_errnop)
        *h_errnop = 0;
    return 0;
}

EXPORT int gethostbyname_r(const char *name, struct hostent *ret, char *buf, size_t buflen,
                           struct hostent **result, int *h_errnop)
{
    REAL(gethostbyname_r);
    int saved = errno;
    if (shim_active() && fake_r(name, AF_INET, ret, buf, buflen, result, h_errnop, 1) == 0) {
        errno = saved;
        return 0;
    }
    errno = saved;
    int r = real_gethostbyname_r(name, ret, buf, buflen, result, h_errnop);
    if ((r == 0 && *result != NULL) || r == ERANGE || !shim_active() || h_errnop == NULL ||
        !fake_worthy(*h_errnop))
        return r;
    saved = errno;
    int f = fake_r(name, AF_INET, ret, buf, buflen, result, h_errnop, 0);
    errno = saved;
    return f < 0 ? r : f;
}

EXPORT int gethostbyname2_r(const char *name, int af, struct hostent *ret, char *buf,
                            size_t buflen, struct hostent **result, int *h_errnop)
{
    REAL(gethostbyname2_r);
    int saved = errno;
    if (shim_active() && fake_r(name, af, ret, buf, buflen, result, h_errnop, 1) == 0) {
        errno = saved;
        return 0;
    }
    errno = saved;
    int r = real_gethostbyname2_r(name, af, ret, buf, buflen, result, h_errnop);
    if ((r == 0 && *result != NULL) || r == ERANGE || !shim_active() || h_errnop == NULL ||
        !fake_worthy(*h_errnop))
        return r;
    saved = errno;
    int f = fake_r(name, af, ret, buf, buflen, result, h_errnop, 0);
    errno = saved;
    return f < 0 ? r : f;
}

EXPORT struct hostent *gethostbyaddr(const void *addr, socklen_t len, int type)
{
    REAL(gethostbyaddr);
    char name[256];
    if (addr != NULL && ((type == AF_INET && len == 4) || (type == AF_INET6 && len == 16))) {
        int saved = errno, again = 0;
        int f = reverse_name(addr, type, name, sizeof name, 1, &again);
        errno = saved;
        if (f == 1) {
            h_errno = again ? TRY_AGAIN : HOST_NOT_FOUND;
            return NULL;
        }
        if (f == 0 &&
            fill_hostent(name, type, ipv4_of(addr, type), &tls_he, tls_buf, sizeof tls_buf) == 0) {
            h_errno = 0;
            return &tls_he;
        }
    }
    return real_gethostbyaddr(addr, len, type);
}

EXPORT int gethostbyaddr_r(const void *addr, socklen_t len, int type, struct hostent *ret,
                           char *buf, size_t buflen, struct hostent **result, int *h_errnop)
{
    REAL(gethostbyaddr_r);
    char name[256];
    if (addr != NULL && ((type == AF_INET && len == 4) || (type == AF_INET6 && len == 16))) {
        int saved = errno, again = 0;
        int f = reverse_name(addr, type, name, sizeof name, 1, &again);
        errno = saved;
        if (f == 1) { /* as glibc: not found is 0 with no result, a temporary failure EAGAIN */
            *result = NULL;
            if (h_errnop)
                *h_errnop = again ? TRY_AGAIN : HOST_NOT_FOUND;
            return again ? EAGAIN : 0;
        }
        if (f == 0) {
            if (fill_hostent(name, type, ipv4_of(addr, type), ret, buf, buflen) < 0) {
                *result = NULL;
                if (h_errnop)
                    *h_errnop = NETDB_INTERNAL;
                return ERANGE;
            }
            *result = ret;
            if (h_errnop)
                *h_errnop = 0;
            return 0;
        }
        errno = saved;
    }
    return real_gethostbyaddr_r(addr, len, type, ret, buf, buflen, result, h_errnop);
}

EXPORT int getnameinfo(const struct sockaddr *sa, socklen_t salen, char *host, socklen_t hostlen,
                       char *serv, socklen_t servlen, int flags)
{
    REAL(getnameinfo);
    if (shim_active() && sa != NULL && host != NULL && hostlen > 0 &&
        !(flags & NI_NUMERICHOST)) {
        const void *a = NULL;
        if (sa->sa_family == AF_INET && salen >= (socklen_t)sizeof(struct sockaddr_in))
            a = &((const struct sockaddr_in *)sa)->sin_addr;
        else if (sa->sa_family == AF_INET6 && salen >= (socklen_t)sizeof(struct sockaddr_in6))
            a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        if (a != NULL) {
            int saved = errno, again = 0;
            /* a real address goes through the front for the flags its answer can honour */
            int f = reverse_name(a, sa->sa_family, host, hostlen,
                                 !(flags & ~(NI_NAMEREQD | NI_NUMERICSERV | NI_DGRAM)), &again);
            errno = saved;
            if (f == -2)
                return EAI_OVERFLOW;
            if (f == 1) {
                if (flags & NI_NAMEREQD)
                    return again ? EAI_AGAIN : EAI_NONAME;
                return real_getnameinfo(sa, salen, host, hostlen, serv, servlen,
                                        flags | NI_NUMERICHOST);
            }
            if (f == 0) {
                if (serv != NULL && servlen > 0)
                    return real_getnameinfo(sa, salen, NULL, 0, serv, servlen, flags);
                return 0;
            }
        }
    }
    return real_getnameinfo(sa, salen, host, hostlen, serv, servlen, flags);
}
