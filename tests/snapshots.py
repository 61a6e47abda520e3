"""What a folder holds, byte for byte: the refusal tests compare it before and after a command."""

from pathlib import Path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`, by relative path; symlinks are not followed."""
    return {str(p.relative_to(root)): None if p.is_dir() and not p.is_symlink() else p.read_bytes()
            for p in sorted(root.rglob("*"))}
