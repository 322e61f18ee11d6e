/* Versioned node state: the layout of what a release pins under a bpffs root (which maps, their
 * value layouts, which hooks a pod has). A release adopts the pins of an older layout it knows and
 * refuses a newer one; `dp_layout_downgrade` hands the node to an older release. */
#ifndef AMBIENT_LAYOUT_H
#define AMBIENT_LAYOUT_H

#include <bpf/libbpf.h>

#include "dp_error.h"

/* 0: nothing pinned yet; 1: v0.1.0's pins (which carry no stamp); else the stamp. */
int layout_read(const char *root, unsigned *layout, struct dp_error *e);

/* The error for pins of a layout newer than this release's, naming both and the way back. */
int layout_refuse_newer(const char *root, unsigned found, struct dp_error *e);

/* Where a map of the BPF object is pinned in `layout` (its name, or name_vN once its value layout
 * changed in layout N: the older pin stays for a rollback). */
void layout_pin_name(const char *map, unsigned layout, char out[64]);

/* After the object loaded with this layout's pins: copies what the maps of layout `from` hold into
 * the maps whose layout changed since, then stamps DATAPATH_LAYOUT. Running pods keep their programs
 * (and those their maps) until their next attach swaps them in place. Call under the root's lock. */
int layout_adopt(const char *root, unsigned from, struct bpf_object *obj, struct dp_error *e);

/* Turns the pins into layout `to` (older) for an older release to adopt: hooks `to` does not know
 * are detached from every pod (pods stay redirected by the rest), maps copied back to their older
 * pins, this layout's own pins removed, the stamp last. Stop this release's agent first. */
int dp_layout_downgrade(const char *root, unsigned to, unsigned *from, struct dp_error *e);

#endif
