"""``torusblk tcmu``: a torus volume as a local SCSI disk through LIO's ``target_core_user``.

- :mod:`~torus_core.tcmu.scsi`: the SCSI command set over an NBD-style
  :class:`~torus_core.nbd.export.Export` (pure Python, no kernel needed);
- :mod:`~torus_core.tcmu.ring`: the TCMU mailbox and command ring in shared memory;
- :mod:`~torus_core.tcmu.uio`: ``/dev/uioN`` (mmap, wait, notify) and the handler thread;
- :mod:`~torus_core.tcmu.configfs`: the ``user_N`` backstore and the ``tcm_loop`` LUN;
- :mod:`~torus_core.tcmu.serve`: the wiring to a :class:`~torus_core.daemon.server.Server`.

See docs/tcmu.md.
"""
