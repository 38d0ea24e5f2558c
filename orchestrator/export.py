"""`seqfoundry export`: a checkpoint of a run → a model package, and a package → the formats the
field serves with (Hugging Face `transformers`, CTranslate2).

    seqfoundry export run.dir=runs/p1                                   # best (else latest) checkpoint -> runs/p1/model
    seqfoundry export run.dir=runs/p1 export.tag=step_00000100 export.out=pkg100
    seqfoundry export run.dir=runs/p1 export.average_last=3             # the last 3 checkpoints averaged
    seqfoundry export run.dir=runs/p1 export.format=hf export.out=hf/   # from_pretrained(hf/) loads it
    seqfoundry export export.package=runs/p1/model export.format=ctranslate2 export.quantization=int8

Everything that can be refused (a format the architecture has no match in, a
missing checkpoint) is refused in one line before any work.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from data_pipeline.storage import is_remote
from trainers.package import PackageError, read_model_config

from .artifacts import log_run_package
from .config import ConfigError, ExportConfig, JobConfig
from .driver import write_package
from .preflight import check_package, saved_run
from .runs import Run


def run(job: JobConfig) -> int:
    e = job.export
    if e.format == "package":
        saved = saved_run(job.run.dir)
        package = export_checkpoint(saved, e)
        log_run_package(job.tracking, saved, package, aliases=(e.tag,) if e.tag else ())  # a W&B model artifact
        print(f"export: {package}")
        return 0
    if e.package:
        package = check_package(e.package, key="export.package")
        print(f"export: {convert(package, e, out=e.out or f'{package}-{e.format}')}")
        return 0
    run_ = saved_run(job.run.dir)
    out = e.out or run_.folder.where(f"model-{e.format}")
    packaged = Path(run_.folder.where("model"))
    if not e.tag and not run_.folder.remote and (packaged / "model.safetensors").is_file():
        print(f"export: {convert(packaged, e, out=out)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="seqfoundry-export-") as tmp:
        package = export_checkpoint(run_, ExportConfig(tag=e.tag, average_last=e.average_last,
                                                       out=str(Path(tmp) / "model")))
        print(f"export: {convert(Path(package), e, out=out)}")
    return 0


def export_checkpoint(run: Run, e: ExportConfig) -> str:
    """The package of checkpoint `export.tag` (default: the best validated one with `trainer.best_metric`,
    else the latest), averaged over `export.average_last` kept checkpoints up to it."""
    found = run.checkpoints.all()
    if not found:
        raise ConfigError(f"run.dir: no checkpoint under {run.checkpoints.location}")
    names = [p.name for p in found]
    if e.tag and e.tag not in names:
        raise ConfigError(f"export.tag: {run.checkpoints.get(e.tag)} not found")
    default = run.checkpoints.best() or found[-1]
    last = names.index(e.tag or default.name)
    if e.average_last > last + 1:
        raise ConfigError(f"export.average_last: {e.average_last} checkpoints asked, {last + 1} kept up to "
                          f"{names[last]} (raise trainer.keep_last, or set export.tag)")
    earlier = found[last - e.average_last + 1: last]
    return write_package(run, checkpoint=found[last], out=e.out or None, average=earlier)


def convert(package: Path, e: ExportConfig, *, out: str) -> Path:
    """The package as a `transformers` folder or a CTranslate2 model (refusals name the key)."""
    if is_remote(out):
        raise ConfigError(f"export.out: {out}: hf and ctranslate2 exports are written to a local folder")
    try:
        if e.format == "hf":
            from trainers.export_hf import export_hf, hf_model_type

            hf_model_type(read_model_config(package))  # refuses a configuration HF has no architecture for
            return export_hf(package, out)
        from trainers.export_ct2 import check_exportable, export_ctranslate2

        check_exportable(read_model_config(package))
        return export_ctranslate2(package, out, quantization=e.quantization or None)
    except (PackageError, ValueError) as err:
        raise ConfigError(str(err) if str(err).startswith(("model.", "export.")) else f"export.format: {err}") from None
