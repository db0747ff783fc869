"""Files that hold secrets (private from their first byte), and the app's own files."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only (0600 at creation, never briefly
    readable by others); an existing file is refused rather than overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def bundle_files(app_dir: Path) -> dict[str, Path]:
    """The files Flower's app bundle (FAB) is built from, as Flower's
    ``collect_files(app_dir)`` finds them, without walking the folders that no
    ``fab-include`` pattern reaches. An app folder that holds its virtual environment,
    data and runs has ~10^5 files: Flower's walk took 4 s of CPU per bank (ten banks on
    two cores: 20 s of every start) for a bundle of ~30 files. Flower filters the
    result as it would the full walk. Pruning needs every pattern anchored (gitignore
    rules: a slash before its end, "common/**/*.py") under a literal top folder of the
    app; otherwise the whole folder is walked, as Flower does. Besides those folders
    only ``pyproject.toml`` and ``.gitignore`` (which Flower reads) are taken.
    ``tests/test_bank_boundary.py`` checks the bundle is byte for byte Flower's own."""
    from flwr.cli.utils import collect_files

    root = app_dir.expanduser().resolve()
    app = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    patterns = list(app.get("fab-include", []))
    folders = {path.name: path for path in root.iterdir()
               if path.is_dir() and not path.is_symlink()}
    tops = {pattern.lstrip("/").split("/", 1)[0] for pattern in patterns}
    anchored = all(pattern.startswith("/") or "/" in pattern.rstrip("/")
                   for pattern in patterns)
    if not patterns or not anchored or not tops <= folders.keys():
        return collect_files(root)
    files = {name: root / name for name in ("pyproject.toml", ".gitignore")
             if (root / name).is_file() and not (root / name).is_symlink()}
    for top in sorted(tops):
        files.update({f"{top}/{name}": path
                      for name, path in collect_files(folders[top]).items()})
    return files
