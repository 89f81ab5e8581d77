"""Datasets on disk: three layouts, one validated in-memory description.

``load_dataset`` returns an ``ImageDataset`` whose train table has ``id, path, label`` and whose
test table has ``id, path``. Every check that can be made without decoding pixels happens here,
before training; decoding errors are reported by ``oof.images`` in one pass, also before training.
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from oof.errors import DataError
from oof.images import IMAGE_EXTENSIONS, MAX_LISTED

LAYOUTS = ("auto", "competition", "imagefolder", "csv")


def natural_key(text: str) -> tuple[list[object], str]:
    """Sort key that puts 'class2' before 'class10' (and '2' before '10').

    ``re.split`` with a group alternates text and digit runs, so odd positions are the numbers
    (``str.isdigit`` would also accept '²', which ``int`` refuses). The raw text breaks ties
    ('Cat' vs 'cat', 'a01' vs 'a1'), so the order never depends on the listing order of the disk.
    """
    parts = re.split(r"(\d+)", str(text))
    return [int(tok) if i % 2 else tok.lower() for i, tok in enumerate(parts)], str(text)


@dataclass
class ImageDataset:
    """A labelled training set and an unlabelled test set, validated."""

    name: str
    root: Path
    layout: str
    classes: list[str]
    train: pd.DataFrame  # id, path, label (class name as str)
    test: pd.DataFrame  # id, path
    submission_columns: tuple[str, str] = ("Id", "Category")
    sample_submission: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def labels_as_int(self) -> list[int]:
        index = self.class_index
        return [index[label] for label in self.train["label"]]


def _listing(items: list[str], what: str) -> str:
    shown = "\n  ".join(items[:MAX_LISTED])
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{len(items)} {what}:\n  {shown}{more}"


def _read_csv(path: Path, needed: tuple[str, ...]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as CSV ({exc})") from exc
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; it has {list(df.columns)}, "
            f"needs {list(needed)}"
        )
    return df


def _check_duplicates(df: pd.DataFrame, column: str, source: Path) -> None:
    dup = df[df[column].duplicated(keep=False)]
    if len(dup):
        rows = [f"row {i + 2}: {column}={v!r}" for i, v in dup[column].items()]
        raise DataError(f"{source}: duplicate {column} values, " + _listing(rows, "rows"))


def _check_files_exist(df: pd.DataFrame, source: Path) -> None:
    missing, special = [], []
    for i, p in df["path"].items():
        where = f"row {i + 2}: {p}" if source.suffix == ".csv" else str(p)
        if Path(p).is_file():
            continue
        kind = _special_kind(Path(p)) if Path(p).is_symlink() or Path(p).exists() else None
        if kind is not None:
            special.append(f"{where} ({kind})")
        else:
            missing.append(where)
    if special:
        raise DataError(f"{source}: files listed are not regular files, "
                        + _listing(special, "files"))
    if missing:
        raise DataError(f"{source}: files listed but missing, " + _listing(missing, "files"))


def _special_kind(path: Path) -> str | None:
    """What ``path`` is when it is neither a regular file nor a folder (None when it is one).

    A FIFO or a device opened as an image would hang or read forever, and skipping one silently
    would drop a sample, so callers refuse them by name.
    """
    try:
        mode = path.stat().st_mode  # follows symlinks: a link to /dev/zero is a device
    except OSError:
        return "broken symlink" if path.is_symlink() else "unreadable entry"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _check_utf8_name(path: Path, where: Path) -> None:
    """A name that is not valid UTF-8 cannot go into CSV/parquet ids: refuse it by name."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError as exc:
        shown = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise DataError(
            f"{where}: the name '{shown}' is not valid UTF-8 ({exc.reason}); rename it"
        ) from exc


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``; FIFOs, devices, broken links and non-UTF-8 names refused."""
    found, special = [], []
    for p in folder.rglob("*"):
        _check_utf8_name(p, folder)
        kind = _special_kind(p)
        if kind is not None:
            special.append(f"{p}: {kind}")
        elif p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            found.append(p)
    if special:
        raise DataError(f"{folder}: entries that are not regular files or folders, "
                        + _listing(sorted(special), "entries"))
    return sorted(found, key=lambda p: natural_key(str(p.relative_to(folder))))


def _test_from_folder(folder: Path) -> pd.DataFrame:
    files = _image_files(folder)
    if not files:
        kinds = ", ".join(IMAGE_EXTENSIONS)
        raise DataError(f"{folder}: the test folder holds no images ({kinds})")
    ids = [str(p.relative_to(folder).as_posix()) for p in files]
    return pd.DataFrame({"id": ids, "path": [str(p) for p in files]})


def _check_labels(df: pd.DataFrame, classes: list[str], source: Path, where: str) -> None:
    known = set(classes)
    bad = [f"row {i + 2}: label {v!r}" for i, v in df["label"].items() if v not in known]
    if bad:
        raise DataError(
            f"{source}: labels not in the class set ({where}: {classes}), " + _listing(bad, "rows")
        )


def _load_competition(root: Path) -> ImageDataset:
    train_csv = root / "train.csv"
    df = _read_csv(train_csv, ("Id", "Category"))
    if df.empty:
        raise DataError(f"{train_csv}: no rows")
    _check_duplicates(df, "Id", train_csv)
    class_dirs = sorted((p.name for p in (root / "train").iterdir() if p.is_dir()), key=natural_key)
    train = pd.DataFrame({"id": df["Id"], "label": df["Category"]})
    _check_labels(train, class_dirs, train_csv, "folders under train/")
    train["path"] = [str(root / "train" / c / i) for i, c in zip(df["Id"], df["Category"])]
    _check_files_exist(train, train_csv)
    classes = sorted(train["label"].unique(), key=natural_key)

    sample = root / "sample-submission.csv"
    test_dir = root / "test_upload"
    if sample.exists():
        sub = _read_csv(sample, ("Id", "Category"))
        _check_duplicates(sub, "Id", sample)
        if sub.empty:
            raise DataError(f"{sample}: no rows, so the test set is empty")
        test = pd.DataFrame({"id": sub["Id"], "path": [str(test_dir / i) for i in sub["Id"]]})
        _check_files_exist(test, sample)
    elif test_dir.is_dir():
        test = _test_from_folder(test_dir)
    else:
        raise DataError(f"{root}: neither sample-submission.csv nor test_upload/ found")
    return ImageDataset(
        name=root.name, root=root, layout="competition", classes=classes,
        train=train[["id", "path", "label"]], test=test,
        sample_submission=sample if sample.exists() else None,
    )


def _load_imagefolder(root: Path) -> ImageDataset:
    train_dir = root / "train"
    for p in train_dir.iterdir():
        _check_utf8_name(p, train_dir)
    class_dirs = sorted((p for p in train_dir.iterdir() if p.is_dir()),
                        key=lambda p: natural_key(p.name))
    if not class_dirs:
        raise DataError(f"{train_dir}: no class folders (expected train/<class name>/<images>)")
    rows = []
    for cdir in class_dirs:
        for p in _image_files(cdir):
            rows.append((p.relative_to(train_dir).as_posix(), str(p), cdir.name))
    train = pd.DataFrame(rows, columns=["id", "path", "label"])
    empty = [c.name for c in class_dirs if not (train["label"] == c.name).any()]
    if empty:
        raise DataError(f"{train_dir}: class folder(s) without images: {empty}")
    test_dir = next((root / n for n in ("test", "test_upload") if (root / n).is_dir()), None)
    test = _test_from_folder(test_dir) if test_dir else pd.DataFrame({"id": [], "path": []})
    return ImageDataset(
        name=root.name, root=root, layout="imagefolder",
        classes=[c.name for c in class_dirs], train=train, test=test,
        submission_columns=("id", "label"),
    )


def _load_csv(table: Path, test: str | None) -> ImageDataset:
    df = _read_csv(table, ("path", "label"))
    if df.empty:
        raise DataError(f"{table}: no rows")
    base = table.parent
    df["path"] = [str(p if Path(p).is_absolute() else base / p) for p in df["path"]]
    df["id"] = df["id"] if "id" in df.columns else [
        Path(p).relative_to(base).as_posix() if Path(p).is_relative_to(base) else p
        for p in df["path"]
    ]
    _check_duplicates(df, "id", table)
    _check_files_exist(df, table)
    classes = sorted(df["label"].unique(), key=natural_key)
    test_path = Path(test) if test else next(
        (p for p in (base / "test.csv", base / "test") if p.exists()), None
    )
    if test_path is None:
        raise DataError(
            f"{table}: no test set; pass --test DIR_OR_CSV, or put test.csv or test/ beside it"
        )
    if test_path.is_dir():
        test_df = _test_from_folder(test_path)
    else:
        tdf = _read_csv(test_path, ("path",))
        if tdf.empty:
            raise DataError(f"{test_path}: no rows, so the test set is empty")
        tbase = test_path.parent
        tdf["path"] = [str(p if Path(p).is_absolute() else tbase / p) for p in tdf["path"]]
        tdf["id"] = tdf["id"] if "id" in tdf.columns else [Path(p).name for p in tdf["path"]]
        _check_duplicates(tdf, "id", test_path)
        _check_files_exist(tdf, test_path)
        test_df = tdf[["id", "path"]]
    return ImageDataset(
        name=table.stem if table.stem not in ("train", "labels") else base.name,
        root=base, layout="csv", classes=classes,
        train=df[["id", "path", "label"]].reset_index(drop=True), test=test_df,
        submission_columns=("id", "label"),
    )


def detect_layout(data: Path) -> str:
    """Guess the layout from what is on disk; the error says what was looked for."""
    if data.is_file() and data.suffix.lower() == ".csv":
        return "csv"
    if not data.is_dir():
        raise DataError(f"--data {data}: no such folder or CSV file")
    train_csv = data / "train.csv"
    if train_csv.is_file():
        with train_csv.open(encoding="utf-8-sig", errors="replace") as fh:  # Excel writes a BOM
            header = fh.readline()
        columns = [c.strip() for c in header.split(",")]
        if "Id" in columns and "Category" in columns and (data / "train").is_dir():
            return "competition"
        if "path" in columns and "label" in columns:
            return "csv"
        if "Id" in columns and "Category" in columns:
            raise DataError(f"{train_csv} has Id,Category (competition layout) but {data / 'train'}"
                            " is not a folder of train/<class>/<images>")
        raise DataError(
            f"{train_csv}: columns {columns} match no layout; expected Id,Category (competition "
            "layout, with train/<class>/ folders) or path,label (csv layout). Fix the header, or "
            "pass --layout imagefolder to ignore train.csv and read the train/<class>/ folders"
        )
    if (data / "train").is_dir():
        return "imagefolder"
    raise DataError(
        f"--data {data}: layout not recognised; expected train.csv (Id,Category) with train/ "
        "(competition), train/<class>/ folders (imagefolder), or a path,label CSV (csv)"
    )


def load_dataset(data: str | Path, layout: str = "auto", test: str | None = None) -> ImageDataset:
    """Load and validate a dataset; ``data='demo'`` (digits) or ``'demo-fashion'`` writes and
    loads a bundled demo (``oof.demo.DEMO_DATA``)."""
    from oof.demo import DEMO_DATA, resolve_demo

    if str(data) in DEMO_DATA:
        data = resolve_demo(str(data)) or data
    if layout not in LAYOUTS:
        raise DataError(f"--layout {layout!r}: choose one of {LAYOUTS}")
    path = Path(data).expanduser().resolve()
    if layout == "auto":
        layout = detect_layout(path)
    if layout == "csv":
        table = path if path.is_file() else path / "train.csv"
        return _load_csv(table, test)
    if not path.is_dir():
        raise DataError(f"--data {path}: no such folder")
    if layout == "competition":
        return _load_competition(path)
    return _load_imagefolder(path)
