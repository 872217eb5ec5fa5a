"""RAM block images: a versioned, self-describing file format with holes and checksums.

The public API, all of it usable from any thread (the daemon calls the I/O functions from a
job's worker thread while the blocks involved are pinned):

- :func:`write_image` writes blocks' contents, supplied by a ``read`` callable, to an fd;
- :func:`verify` checks a whole image without changing anything and returns its
  :class:`ImageInfo`; :func:`load` then replays it through ``write`` and ``zero`` callables;
  :func:`read_info` and :func:`verify_data` are the two halves of :func:`verify`, the second
  able to load blocks nobody can see yet while it checks them (one pass instead of two);
- :func:`atomic_target`, :func:`open_image`, :func:`open_state_dir` and
  :func:`remove_stale_temporaries` handle image files in the state directory;
- every failure is an :class:`ImageError` (a :class:`ramd.errors.RamdError`) with one clear
  line; a cancel is its subclass :class:`ImageCancelled`.

The format is documented in ``docs/image-format.md``.
"""

from ramd.snapshot.callbacks import CancelledFn, ProgressFn
from ramd.snapshot.files import (
    atomic_target,
    check_name,
    open_image,
    open_state_dir,
    remove_stale_temporaries,
)
from ramd.snapshot.format import (
    VERSION,
    BlockDescriptor,
    ImageBlock,
    ImageCancelled,
    ImageError,
    ImageInfo,
)
from ramd.snapshot.reader import WriteFn, ZeroFn, load, read_info, verify, verify_data
from ramd.snapshot.writer import ReadFn, write_image

__all__ = [
    "VERSION",
    "BlockDescriptor",
    "CancelledFn",
    "ImageBlock",
    "ImageCancelled",
    "ImageError",
    "ImageInfo",
    "ProgressFn",
    "ReadFn",
    "WriteFn",
    "ZeroFn",
    "atomic_target",
    "check_name",
    "load",
    "open_image",
    "open_state_dir",
    "read_info",
    "remove_stale_temporaries",
    "verify",
    "verify_data",
    "write_image",
]
