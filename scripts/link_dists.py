"""Hard-links installed distributions from this interpreter's site-packages into another venv's.

    SRC_VENV/bin/python scripts/link_dists.py DEST_SITE_PACKAGES torch torchvision

Both test hosts need the same torch 2.14.1 + torchvision 0.29.1 CUDA build (about 5.5 GB with its
nvidia-* and triton wheels). Installing it twice doubles the disk a fresh machine needs, and CI's
machine does not always have that much free. This links the named distributions and everything they
require (recursively, with the extras asked for) file by file, as pip recorded them in RECORD: the second venv
costs no disk for them, and its pip sees them as installed (their .dist-info is linked too). pip
replaces files by unlinking, so an upgrade in either venv never changes the other.

Exits 1, having linked nothing, when a file cannot be hard-linked (another filesystem): the caller
then installs normally.
"""
import importlib.metadata as md
import os
import sys
import sysconfig


def closure(names):
    """The named distributions and, recursively, every installed one they require, with the extras
    asked for (torch asks for cuda-toolkit[cublas,cufft,...], whose extras bring the nvidia-* wheels)."""
    from pip._vendor.packaging.requirements import Requirement   # pip's own parser, in every venv

    seen, todo = {}, [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        key = req.name.lower().replace("_", "-")
        extras = set(req.extras) - seen.get(key, (None, set()))[1]
        if key in seen and not extras:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue                     # a requirement whose marker excludes this platform
        first = key not in seen
        seen[key] = (dist, seen.get(key, (None, set()))[1] | set(req.extras))
        for line in dist.requires or []:
            r = Requirement(line)
            wanted = ([""] if first else []) + sorted(extras)
            if r.marker is None and first or r.marker is not None and any(
                    r.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(r)
    return [d for d, _ in seen.values()]


def main(dest, names):
    src = sysconfig.get_paths()["purelib"]
    pairs, dists = [], closure(names)
    for dist in dists:
        for f in dist.files or []:
            path = os.path.normpath(os.path.join(src, f))
            if path.startswith(src + os.sep) and os.path.isfile(path):   # console scripts in bin/ are not linked
                pairs.append((path, os.path.join(dest, os.path.relpath(path, src))))
    probe_src, probe_dest = pairs[0][0], os.path.join(dest, ".link-probe")
    try:
        os.makedirs(dest, exist_ok=True)
        os.link(probe_src, probe_dest)
        os.unlink(probe_dest)
    except OSError as e:
        print(f"link_dists: cannot hard-link {src} -> {dest}: {e}", file=sys.stderr)
        return 1
    for a, b in pairs:
        if not os.path.exists(b):
            os.makedirs(os.path.dirname(b), exist_ok=True)
            os.link(a, b)
    print(f"link_dists: linked {len(pairs)} files of {len(dists)} distributions into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
