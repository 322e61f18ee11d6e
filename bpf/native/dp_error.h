/* Errors of the native datapath: a stable code for callers and a message for people. */
#ifndef AMBIENT_DP_ERROR_H
#define AMBIENT_DP_ERROR_H

struct dp_error {
	const char *code; /* stable, for callers: see the DP_E* below */
	char message[768];
};

#define DPE_INVALID "EINVALID" /* bad argument */
#define DPE_NETNS "ENETNS" /* netns path missing or not a network namespace */
#define DPE_POD_IP "EPODIP" /* a pod IP is not configured in the netns */
#define DPE_BPFFS "EBPFFS" /* no bpffs where pins should go */
#define DPE_KERNEL "EKERNEL" /* the kernel lacks a feature */
#define DPE_LOAD "ELOAD" /* the BPF object did not load */
#define DPE_LAYOUT "ELAYOUT" /* the pins are from a layout this release cannot adopt */
#define DPE_SYSTEM "ESYSTEM" /* anything else, with errno text */

/* Fills *e (err: an errno, appended as text when non-zero); returns -1. */
int dp_fail(struct dp_error *e, const char *code, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

#endif
