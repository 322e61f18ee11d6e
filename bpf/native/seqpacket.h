/* Unix SEQPACKET sockets with fd passing (SCM_RIGHTS), exported to JS as `seqpacket`. */
#ifndef AMBIENT_SEQPACKET_H
#define AMBIENT_SEQPACKET_H

#include <node_api.h>

void seqpacket_register(napi_env env, napi_value exports);

#endif
