"""The Python distributions bundled in the package's virtualenv (run by debian/rules with its
interpreter, so ``importlib.metadata`` sees exactly what was installed).

``check CONSTRAINTS``: every bundled distribution is pinned, at its installed version, in the
constraints file; an unpinned one (a new dependency nobody locked) fails the build, naming the
line to add.
``copyright TEMPLATE``: the template, then one DEP-5 paragraph per bundled distribution with its
version, the license its metadata declares and where its license text is installed.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

#: Installer tools in the virtualenv while it is built; removed before packaging.
TOOLS = {"pip", "setuptools"}
#: walled-garden itself: built from this tree, not pinned.
SELF = "walled-garden"


def canonical(name: str) -> str:
    """PEP 503 name, as pip compares them (``PyYAML`` = ``pyyaml``, ``nats_py`` = ``nats-py``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def bundled() -> list[metadata.Distribution]:
    """Installed distributions other than the installer tools, sorted by name."""
    dists = {canonical(d.metadata["Name"]): d for d in metadata.distributions()}
    return [dists[n] for n in sorted(dists) if n not in TOOLS]


def pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by canonical name."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonical(name)] = version.strip()
    return out


def check(constraints: Path) -> int:
    pinned = pins(constraints)
    wrong = [f"{d.metadata['Name']}=={d.version} (pinned: {pinned.get(canonical(d.metadata['Name']), 'nothing')})"
             for d in bundled()
             if canonical(d.metadata["Name"]) != SELF and pinned.get(canonical(d.metadata["Name"])) != d.version]
    if wrong:
        print(f"{constraints}: not pinned at the bundled version:\n  " + "\n  ".join(wrong), file=sys.stderr)
        return 1
    return 0


#: License names some metadata spells in words, as DEP-5 short names (no spaces).
SHORT_NAMES = {"Apache 2.0": "Apache-2.0", "Apache License 2.0": "Apache-2.0", "Apache Software License": "Apache-2.0",
               "MIT License": "MIT", "BSD License": "BSD", "ISC License (ISCL)": "ISC",
               "Python Software Foundation License": "PSF-2.0"}


def license_of(dist: metadata.Distribution) -> str:
    """A DEP-5 short name: the SPDX expression, else the License field, else the classifiers'."""
    text = _license_text(dist)
    return SHORT_NAMES.get(text, text)


def _license_text(dist: metadata.Distribution) -> str:
    """The SPDX expression, else the License field, else the OSI classifiers' names."""
    meta = dist.metadata.json
    for value in (str(meta.get("license_expression") or ""), str(meta.get("license") or "")):
        if value and value.strip() and "\n" not in value.strip() and len(value) < 80:
            return value.strip()
    classifiers = [c.rsplit(" :: ", 1)[-1] for c in meta.get("classifier") or [] if c.startswith("License ::")]
    return " or ".join(SHORT_NAMES.get(c, c) for c in classifiers) or "unknown (see the distribution's metadata)"


def copyright_text(template: Path) -> str:
    site = "usr/lib/walled-garden/lib/python3.11/site-packages"
    out = [template.read_text().rstrip("\n")]
    for dist in bundled():
        name = dist.metadata["Name"]
        if canonical(name) == SELF:
            continue
        root = Path(str(dist.locate_file("")))
        tops = sorted({f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")})
        patterns = " ".join(f"{site}/{t}/*" if (root / t).is_dir() else f"{site}/{t}" for t in tops)
        licenses = sorted(str(f) for f in dist.files or [] if re.search(r"LICEN[CS]E|COPYING", f.name.upper()))
        where = ", ".join(f"/{site}/{f}" for f in licenses) or "none installed (see its METADATA)"
        meta = dist.metadata.json
        author = str(meta.get("author") or meta.get("author_email") or meta.get("maintainer") or f"the {name} authors")
        out.append(f"\nFiles: {patterns}\nCopyright: {' '.join(author.split())}\n"
                   f"License: {license_of(dist)}\n Bundled: {name} {dist.version}. License text: {where}")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "check":
        return check(Path(argv[2]))
    if len(argv) == 3 and argv[1] == "copyright":
        sys.stdout.write(copyright_text(Path(argv[2])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
