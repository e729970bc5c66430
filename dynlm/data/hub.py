"""WikiText from the Hugging Face hub (or a local copy of its parquet files), same strict split."""
from __future__ import annotations

from pathlib import Path

from .articles import RawArticle
from .errors import DataError
from .wikitext import split_wikitext_articles

HUB_SPLITS = {"train": "train", "valid": "validation", "validation": "validation", "test": "test"}


def _row_to_line(text: str) -> str:
    # Hub rows are file lines with their "\n"; blank lines are stored as "" there, ' ' in the files.
    line = text.rstrip("\n")
    return line if line.strip() else " "


def _local_files(root: Path, hub_config: str, hub_split: str) -> list[str]:
    for d in (root / hub_config, root):
        files = sorted(d.glob(f"{hub_split}-*.parquet"))
        if files:
            return [str(f) for f in files]
    raise DataError(f"no {hub_split!r} parquet files in {root} (looked for "
                    f"{hub_config}/{hub_split}-*.parquet and {hub_split}-*.parquet)")


def load_hub_split(hub_name: str, hub_config: str, split: str, data_files=None) -> list[RawArticle]:
    """`data_files`: None (download from the hub), a local directory laid out like the hub
    repo (`{hub_config}/{split}-00000-of-00001.parquet`), or a list of parquet files."""
    import datasets

    if split not in HUB_SPLITS:
        raise DataError(f"unknown split {split!r}; valid: train, valid, test")
    hub_split = HUB_SPLITS[split]
    try:
        if data_files is None:
            ds = datasets.load_dataset(hub_name, hub_config, split=hub_split)
        else:
            if isinstance(data_files, (str, Path)):
                data_files = _local_files(Path(data_files), hub_config, hub_split)
            ds = datasets.load_dataset("parquet", data_files={hub_split: list(data_files)}, split=hub_split)
    except DataError:
        raise
    except Exception as e:  # offline, unknown config, bad files: say which dataset failed
        where = hub_name if data_files is None else data_files
        raise DataError(f"could not load {where} ({hub_config}, split {hub_split}): {e}") from e
    if "text" not in ds.column_names:
        raise DataError(f"{hub_name}/{hub_config} has no 'text' column (columns: {ds.column_names})")
    lines = [_row_to_line(t) for t in ds["text"]]
    if not lines:
        raise DataError(f"{hub_name}/{hub_config} split {hub_split} is empty")
    return split_wikitext_articles(lines, split)
