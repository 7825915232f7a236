"""Daemon wiring: the server object behind ``torusd`` / ``torusblk nbdserve`` and its cluster mode.

* :mod:`torus_core.daemon.server`: :class:`~torus_core.daemon.server.Server` (metadata backend,
  block store, volume exports, NBD listener, ``/metrics`` + ``/healthz``) built from a
  :class:`~torus_core.config.Config` and the process's plugin registries.
* :mod:`torus_core.daemon.cluster`: :func:`~torus_core.daemon.cluster.start_cluster_server`,
  which runs a storage :class:`~torus_core.cluster.ClusterNode` under a server
  (``torusd --peer-address``), and :func:`~torus_core.daemon.cluster.peer_tls`.

This package sits directly below the CLIs (and the AoE transport that serves a server's volumes)
and above both :mod:`torus_core.block` and :mod:`torus_core.cluster`: it is the one place that
puts the two together. Nothing is re-exported here; import from the modules.
"""
