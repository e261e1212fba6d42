/*
 * nsvpn LD_PRELOAD shim (libc only).
 *
 * Built by the package build into nsvpn/_preload*.so. The preload-mode issue fills in the
 * connect()/resolver hooks; for now it only proves that the library loads into a process:
 * `nsvpn probe` runs `true` with it and NSVPN_PROBE_FD=<fd>, and the constructor writes a
 * marker line to that fd.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NSVPN_SHIM_VERSION "nsvpn-shim 0.1"

__attribute__((visibility("default"))) const char nsvpn_shim_version[] = NSVPN_SHIM_VERSION;

__attribute__((constructor)) static void nsvpn_shim_init(void)
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
