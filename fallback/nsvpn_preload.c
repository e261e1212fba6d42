/*
 * nsvpn LD_PRELOAD shim (libc only).
 *
 * Built by the package build into nsvpn/_preload*.so. The preload-mode issue fills in the
 * connect()/resolver hooks; for now it only proves that the library loads into a process
 * (nsvpn probe runs `true` with it and checks the marker variable it sets).
 */
#define _GNU_SOURCE
#include <stdlib.h>

__attribute__((constructor)) static void nsvpn_shim_init(void)
{
    /* Nothing to hook yet. */
}

/* Exported so that `nsvpn probe` can check the library really is our shim. */
__attribute__((visibility("default"))) const char nsvpn_shim_version[] = "nsvpn-shim 0.1";
