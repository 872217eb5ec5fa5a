"""VMM attachments (docs/protocol.md §13): the daemon as a QMP client of a running VMM.

- :mod:`ramd.vmm.link`: one ``qemu.qmp`` client connection to one VMM socket, with a timeout
  on everything the VMM owes and a bound on what it sends;
- :mod:`ramd.vmm.access`: the VMM's uid gets read-write access to a block's file;
- :mod:`ramd.vmm.registry`: the attachments, their attach and detach steps with undo, and the
  checks the block commands call (:meth:`~ramd.vmm.registry.Attachments.refuse_change`);
- :mod:`ramd.vmm.records`: each attachment recorded with its block, resumed after a restart.

Everything runs on the daemon's asyncio loop thread.
"""
