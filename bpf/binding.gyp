{
  "targets": [
    {
      "target_name": "ambient_bpf",
      "sources": [
        "native/addon.c",
        "native/cgroup_hooks.c",
        "native/host_hooks.c",
        "native/iface_guard.c",
        "native/datapath.c",
        "native/dp_error.c",
        "native/layout.c",
        "native/pod_ifaces.c",
        "native/pod_policy.c",
        "native/probe.c",
        "native/netns_addresses.c",
        "native/netns_socket.c",
        "native/netns_thread.c",
        "native/netns_watch.c",
        "native/rtnl.c",
        "native/seqpacket.c"
      ],
      "cflags": ["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers", "-Wno-format-truncation", "-Wno-stringop-truncation", "-Werror"],
      "libraries": ["-lbpf", "-lelf", "-lz", "-lpthread"]
    }
  ]
}
