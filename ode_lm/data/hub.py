"""The ``hf`` source: rows of a Hugging Face dataset as documents.

``hf_name`` is a hub dataset (``wikitext`` with ``hf_config = "wikitext-2-raw-v1"``), or a
``datasets`` builder on local files (``json``, ``parquet``, ``csv``, ``text``) with
``hf_data_files``. The dataset stays memory-mapped Arrow; documents read their row on demand.
"""

from __future__ import annotations

from ode_lm.config import DataConfig
from ode_lm.data.corpus import Document, hf_data_files
from ode_lm.errors import DataError

LOCAL_BUILDERS = ("json", "parquet", "csv", "text")
SIZE_BATCH = 1024  # rows per batch when measuring documents


def hf_documents(cfg: DataConfig, split: str) -> list[Document]:
    """One document per row of ``split`` (its ``text_field`` column)."""
    ds = _load(cfg, split)
    if cfg.text_field not in ds.column_names:
        raise DataError(f"[data] text_field = \"{cfg.text_field}\" is not a column of {_name(cfg)}; "
                        f"columns are {', '.join(ds.column_names)}")
    column = ds.select_columns([cfg.text_field]).with_format("arrow")
    sizes = []
    for batch in column.iter(batch_size=SIZE_BATCH):
        lengths = batch.column(0).to_pylist()
        sizes.extend(len(t.encode("utf-8")) if isinstance(t, str) else 0 for t in lengths)

    rows: dict[str, object] = {"first": -1, "texts": []}  # the batch of rows read last

    def row(i: int) -> str:
        first = rows["first"]
        if not first <= i < first + len(rows["texts"]):  # type: ignore[operator, arg-type]
            first = i - i % SIZE_BATCH
            rows["first"], rows["texts"] = first, column[first:first + SIZE_BATCH].column(0).to_pylist()
        return rows["texts"][i - rows["first"]] or ""  # type: ignore[index, operator]

    def reader(i: int):
        def read(start: int, stop: int):
            yield row(i).encode("utf-8")[start:stop]
        return read

    return [Document(f"{cfg.hf_name}/{cfg.hf_config}/{split}/{i}", n, reader(i), is_file=False)
            for i, n in enumerate(sizes)]


def _name(cfg: DataConfig) -> str:
    return f"'{cfg.hf_name}'" + (f" config '{cfg.hf_config}'" if cfg.hf_config else "")


def _load(cfg: DataConfig, split: str):
    import datasets

    datasets.disable_progress_bars()
    files = hf_data_files(cfg) or None
    if cfg.hf_name in LOCAL_BUILDERS and not files:
        raise DataError(f"[data] hf_name = \"{cfg.hf_name}\" reads local files: give hf_data_files = "
                        "[\"train=data/train.parquet\", \"validation=data/val.parquet\"]")
    if files is not None and split not in files:
        raise DataError(f"[data] split '{split}' is not among hf_data_files' splits "
                        f"({', '.join(files)}); name its files as \"{split}=path\"")
    key = "hf_val_split" if split == cfg.hf_val_split and cfg.hf_val_split else "hf_split"
    try:
        return datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, data_files=files, split=split)
    except Exception as e:  # datasets raises many types; the innermost cause says what went wrong
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        text = (str(e).splitlines() or [""])[0]
        if "Unknown split" in text or "Bad split" in text:
            raise DataError(f"[data] {key} = \"{split}\" is not a split of {_name(cfg)}: {text}") from None
        if files:
            raise DataError(f"[data] datasets builder '{cfg.hf_name}' could not read hf_data_files: "
                            f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}") from None
        raise DataError(f"[data] could not load the Hugging Face dataset {_name(cfg)} split "
                        f"'{split}': {type(e).__name__}: {text}. The hub needs network access (or a "
                        "filled local cache); offline, use data.source = \"text\", or hf_name = "
                        "\"parquet\" / \"json\" / \"csv\" / \"text\" with local hf_data_files") from None
