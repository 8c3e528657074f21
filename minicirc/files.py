"""Writing results: atomic files, groups of files that land all or none, and output folders.

Every command writes through these, so that a failure midway never leaves a partial file or a mix of an
earlier run's files and this run's, and an earlier run is never overwritten without --overwrite."""
import os
import shutil
import tempfile
from contextlib import contextmanager

from .errors import MinicircError


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_atomic(path, data: bytes):
    """Write to a temporary name in the same folder and rename, so a failure never leaves a partial file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def staged_files(out_dir):
    """Write several files as one: `with staged_files(d) as stage: write to stage("name.ext")`.

    stage(name) returns a temporary path in out_dir; only when the block completes are all temporaries
    renamed to their names, and on any failure they are removed, so out_dir holds either all of this
    run's files or none of them."""
    os.makedirs(out_dir, exist_ok=True)
    staged = []    # (temporary path, final path)
    umask = _umask()

    def stage(name):
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp" + os.path.splitext(name)[1])
        os.close(fd)
        os.chmod(tmp, 0o666 & ~umask)
        staged.append((tmp, os.path.join(out_dir, name)))
        return tmp

    try:
        yield stage
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


@contextmanager
def staged_folder(folder):
    """Write a whole folder as one: `with staged_folder(d) as tmp: write into tmp`. tmp is a new folder
    beside d; when the block completes it replaces d (an earlier d is removed), and on failure it is
    removed, so d is always either the earlier folder or the complete new one (caches: a run stopped midway
    never leaves files that a later run would take for finished ones)."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(folder)}-")
    os.chmod(tmp, 0o777 & ~_umask())    # mkdtemp makes it private; caches are ordinary user data
    try:
        yield tmp
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def prepare_out_dir(out, overwrite, marker):
    """Refuse to overwrite an earlier run silently (its `marker` file is there and not `overwrite`); create
    the folder; fail early if it cannot be written."""
    if os.path.exists(os.path.join(out, marker)) and not overwrite:
        raise MinicircError(f"{out} already holds {marker} from an earlier run; pass --overwrite or choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise MinicircError(f"cannot create output directory {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise MinicircError(f"output directory {out} is not writable")
