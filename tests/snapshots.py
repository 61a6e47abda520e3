"""What a folder holds, byte for byte: the refusal tests compare it before and after a command."""

from pathlib import Path

from planet_batch.cli import main


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`, by relative path; symlinks are not followed."""
    return {str(p.relative_to(root)): None if p.is_dir() and not p.is_symlink() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


def refused(root: Path, capsys, *argv) -> str:
    """`planet-batch ARGV`: exit 2 and nothing under `root` written or changed; its one line, without the prefix."""
    before = snapshot(root)
    assert main([str(a) for a in argv]) == 2
    assert snapshot(root) == before
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0].removeprefix(f"planet-batch {argv[0]}: error: ")
