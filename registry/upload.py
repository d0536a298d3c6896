"""Uploads a folder as run artifacts, one file at a time, with a progress bar over bytes."""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

from mlflow.tracking import MlflowClient
from tqdm import tqdm


def upload_folder(
    client: MlflowClient, run_id: str, folder: Path, artifact_dir: str, *, progress: bool, label: str = ""
) -> None:
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"uploading {label}".strip(),
        disable=not progress, file=sys.stderr, leave=False,
    ) as bar:
        for path in files:
            relative_dir = PurePosixPath(path.relative_to(folder).as_posix()).parent
            destination = artifact_dir if str(relative_dir) == "." else f"{artifact_dir}/{relative_dir}"
            client.log_artifact(run_id, str(path), destination)
            bar.update(path.stat().st_size)
