"""Large volumes: peak memory and wall time of the bounded path vs nnU-Net's, and CPU engines per tile.

One script, all on CPU:

1. A CT-like generated dataset at a coarse spacing (2.5 mm; air, body, two "organs") and a small
   nnU-Net model trained on it for a few epochs (the weights only have to segment something).
2. A generated CT-like volume at 0.8 mm (``--shape``; the issue asks 512 x 512 x 400, which this
   script scales down when told to so that it finishes on a shared 2-core machine).
3. Each of these in a fresh process, measuring its peak RSS (``wait4``; includes torch and the
   model, the same for all) and the wall time of the prediction call:
   - ``nnUNetv2_predict`` on the volume's file (wall time of the whole command);
   - nnU-Net's in-memory predictor (``predict_single_npy_array``);
   - ours (``AutoNNUNetLib.bounded.predict_bounded``) without a budget and with ``--budget-gb``.
   Label agreement of each with the in-memory stock labels.
4. Seconds per tile of each CPU engine (torch, torch channels_last_3d, torch bfloat16 where the CPU
   has it, ONNX Runtime, OpenVINO) for the hippocampus default model, a searched-like residual model
   and the CT model, and whether each engine's label maps equal torch's (fraction of differing voxels).

Run from the project root (writes the "Large volumes" section at the end of docs/benchmarks.md)::

    python benchmarks/bench_large_volumes.py --work /tmp/bench_large    # the issue's 512 x 512 x 400
    python benchmarks/bench_large_volumes.py --shape 200x200x160 --budget-gb 0.5 --quick   # scaled down
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
HIPPOCAMPUS = PROJECT_ROOT.parent / "shared" / "data" / "Task04_Hippocampus"
TITLE = "Large volumes"
#: Coarse enough that the 512 x 512 x 400 volume at 0.8 mm is 27 tiles (about 3 min per method on 2 cores).
TRAIN_SPACING = 3.0
GB = 1024 ** 3


# ----------------------------------------------------------------------------------------------
# Generated CT-like data


def ct_like(shape, spacing: float, seed: int, slab_rows: int = 32):
    """Air (-1000 HU) around an elliptic body (40 HU) with two ellipsoid organs (liver-like 90 HU,
    kidney-like 160 HU), smooth noise; returns (image int16 as CT is stored, labels uint8) in (z, y, x).

    Built ``slab_rows`` planes at a time, so that generating 512 x 512 x 400 needs a few hundred MB
    rather than several float64 copies of the volume (the parent process must not distort the machine).
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    extent = [n * spacing for n in shape]
    centre = [e / 2 + rng.uniform(-0.05, 0.05) * e for e in extent]
    ellipsoids = [  # (centre, radii, label); the body first
        (centre, [extent[0] * 0.48, extent[1] * 0.42, extent[2] * 0.45], None),
        ([centre[0], centre[1] - extent[1] * 0.1, centre[2] + extent[2] * 0.12],
         [extent[0] * 0.25, extent[1] * 0.16, extent[2] * 0.18], 1),
        ([centre[0] + extent[0] * 0.1, centre[1] + extent[1] * 0.15, centre[2] - extent[2] * 0.2],
         [extent[0] * 0.12, extent[1] * 0.08, extent[2] * 0.08], 2),
    ]
    image = np.empty(shape, dtype=np.int16)
    labels = np.zeros(shape, dtype=np.uint8)
    yx = np.ogrid[0:shape[1], 0:shape[2]]
    halo = 4  # the noise's Gaussian (sigma 1) reaches 4 planes
    for start in range(0, shape[0], slab_rows):
        stop = min(start + slab_rows, shape[0])
        z = np.arange(start, stop)[:, None, None]
        mm = [z * spacing, yx[0][None] * spacing, yx[1][None] * spacing]

        def inside(c, radii):
            return sum(((m - ci) / r) ** 2 for m, ci, r in zip(mm, c, radii)) <= 1.0

        body = inside(*ellipsoids[0][:2])
        slab = np.full((stop - start, shape[1], shape[2]), -1000.0, dtype=np.float32)
        slab[body] = 40.0
        for c, radii, label in ellipsoids[1:]:
            organ = inside(c, radii) & body
            labels[start:stop][organ] = label
            slab[organ] = 90.0 if label == 1 else 160.0
        noise = rng.standard_normal((stop - start + 2 * halo, shape[1], shape[2]), dtype=np.float32)
        slab += ndimage.gaussian_filter(noise, 1.0)[halo:halo + stop - start] * 60.0
        image[start:stop] = np.clip(np.round(slab), -32768, 32767)
    return image, labels


def write_volume(array, spacing: float, path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing, spacing, spacing))
    sitk.WriteImage(image, str(path))


def make_ct_dataset(folder: Path, cases: int = 8, shape=(56, 72, 72)) -> Path:
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for index in range(cases):
        image, labels = ct_like(shape, TRAIN_SPACING, seed=index)
        write_volume(image, TRAIN_SPACING, folder / "imagesTr" / f"ct_{index:03d}_0000.nii.gz")
        write_volume(labels, TRAIN_SPACING, folder / "labelsTr" / f"ct_{index:03d}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "small_organ": 2},
        "numTraining": cases, "file_ending": ".nii.gz",
    }))
    return folder


def train_model(source: Path, work: Path, dataset_id: int, name: str, config=None, epochs: int = 4,
                iterations: int = 10) -> Path:
    from AutoNNUNetLib.config import TrialConfig
    from AutoNNUNetLib.dataset import build_dataset, detect_source
    from AutoNNUNetLib.fingerprint import plan_and_preprocess
    from AutoNNUNetLib.trainer import model_dir_name, train
    from AutoNNUNetLib.workspace import Workspace

    workspace = Workspace(work / f"ws_{name}")
    if not (work / f"ws_{name}" / ".planned").exists():
        build_dataset(detect_source(source), workspace, dataset_id=dataset_id, name=name)
        plan_and_preprocess(workspace, num_processes=1)
        (work / f"ws_{name}" / ".planned").write_text("")
    config = config or TrialConfig()
    model_dir = work / f"model_{name}_{config.encoder_type}_{config.base_num_features}" / model_dir_name()
    if not (model_dir / "fold_0" / "checkpoint_final.pth").exists():
        train(workspace, config, model_dir, folds=[0], epochs=epochs, iterations_per_epoch=iterations,
              device="cpu", seed=0)
    return model_dir


# ----------------------------------------------------------------------------------------------
# One measured prediction per process


def _load(model_dir: str, mirroring: bool = False):
    import contextlib
    import io

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(use_mirroring=mirroring, perform_everything_on_device=False,
                                    device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model_dir, use_folds=(0,))
    return predictor


def child(method: str, model_dir: str, image_path: str, output: str, budget: float) -> None:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    predictor = _load(model_dir)
    image, properties = SimpleITKIO().read_images([image_path])
    # What the process holds before the call (torch, the model, the float32 image), and its peak so far
    # (reading the file): the same for every method, so they tell how much of a peak is the method's.
    before = {key: _status_bytes(key) for key in ("VmRSS", "VmHWM")}
    start = time.perf_counter()
    if method == "stock":
        labels = predictor.predict_single_npy_array(image, properties, None, None, False)
    else:
        from AutoNNUNetLib.bounded import predict_bounded

        labels = predict_bounded(predictor, image, properties, max_memory_gb=budget if method == "budget" else None)
    seconds = time.perf_counter() - start
    np.save(output, np.asarray(labels))
    print(json.dumps({"seconds": seconds, "rss_before": before["VmRSS"], "peak_before": before["VmHWM"]}))


def _status_bytes(key: str) -> int:
    """A /proc/self/status memory line in bytes (0 where /proc does not exist)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(command: list[str], env=None) -> tuple[dict, float, float]:
    """Run a command; return (its last JSON line or {}, wall seconds, peak RSS bytes via wait4)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    # The peak RSS comes from the --peak wrapper around the command (wait4 of its own child).
    if process.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    data = json.loads(lines[-1]) if lines else {}
    return data, wall, float(data.get("peak_rss", 0))


def peak_wrapper() -> None:
    """``--peak -- CMD...``: run CMD, print its JSON output plus its peak RSS (wait4) as one JSON line."""
    command = sys.argv[sys.argv.index("--") + 1:]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    data = json.loads(lines[-1]) if lines else {}
    data["peak_rss"] = usage.ru_maxrss * 1024
    data["status"] = os.waitstatus_to_exitcode(status)
    print(json.dumps(data))
    sys.exit(0 if data["status"] == 0 else 1)


def measure_methods(model_dir: Path, image_path: Path, work: Path, budget: float, env: dict) -> dict:
    from AutoNNUNetLib.model import install_for_nnunet

    results = {}
    me = [sys.executable, str(Path(__file__).resolve())]
    for method in ("stock", "ours", "budget"):
        output = work / f"labels_{method}.npy"
        data, wall, peak = run_measured(me + ["--peak", "--"] + me + [
            "--child", method, "--model", str(model_dir), "--image", str(image_path), "--output", str(output),
            "--budget-gb", str(budget)], env=env)
        results[method] = {"seconds": data["seconds"], "peak_rss": peak, "labels": output,
                           "rss_before": data.get("rss_before", 0), "peak_before": data.get("peak_before", 0)}
        print(f"{method}: {data['seconds']:.1f} s, peak RSS {peak / GB:.2f} GB", flush=True)
    # nnUNetv2_predict: the command on the same file (wall time of the whole command).
    nnunet_results = work / "nnunet_results"
    install_for_nnunet(model_dir, nnunet_results, overwrite=True)
    plans = json.loads((model_dir / "plans.json").read_text())
    inputs, outputs = work / "cli_in", work / "cli_out"
    inputs.mkdir(exist_ok=True)
    outputs.mkdir(exist_ok=True)
    target = inputs / "large_0000.nii.gz"
    if not target.exists():
        os.symlink(image_path, target)
    cli_env = dict(env, nnUNet_results=str(nnunet_results), nnUNet_raw=str(work), nnUNet_preprocessed=str(work))
    start = time.perf_counter()
    # The command sits beside this interpreter (a venv's bin), which need not be on PATH.
    command = shutil.which("nnUNetv2_predict", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                      os.environ.get("PATH", "")]))
    if command is None:
        raise RuntimeError("nnUNetv2_predict not found beside this Python or on PATH; install nnunetv2")
    data, wall, peak = run_measured(me + ["--peak", "--", command, "-i", str(inputs), "-o", str(outputs),
                                          "-d", plans["dataset_name"], "-c", "3d_fullres", "-f", "0",
                                          "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env=cli_env)
    wall = time.perf_counter() - start
    import SimpleITK as sitk

    cli_labels = work / "labels_cli.npy"
    np.save(cli_labels, sitk.GetArrayFromImage(sitk.ReadImage(str(outputs / "large.nii.gz"))))
    results["cli"] = {"seconds": wall, "peak_rss": peak, "labels": cli_labels}
    print(f"cli: {wall:.1f} s, peak RSS {peak / GB:.2f} GB", flush=True)
    reference = np.load(results["stock"]["labels"], mmap_mode="r")
    for method, entry in results.items():
        labels = np.load(entry["labels"], mmap_mode="r")
        entry["differing"] = int(np.count_nonzero(np.asarray(labels) != np.asarray(reference)))
        entry["voxels"] = int(reference.size)
        entry["foreground"] = int(np.count_nonzero(np.asarray(labels)))
    return results


# ----------------------------------------------------------------------------------------------
# Engines


def engine_rows(name: str, model_dir: Path, volumes, repeats: int = 4) -> list[dict]:
    import torch

    from AutoNNUNetLib.bounded import predict_bounded
    from AutoNNUNetLib.engines import cpu_has_bfloat16, make_engine

    predictor = _load(str(model_dir))
    patch = [int(v) for v in predictor.configuration_manager.patch_size]
    channels = len(predictor.dataset_json["channel_names"])
    tile = torch.randn((1, channels, *patch))
    variants = [("torch", {}), ("torch channels_last_3d", {"channels_last": True})]
    if cpu_has_bfloat16():
        variants.append(("torch bfloat16", {"bfloat16": True}))
    variants += [("onnxruntime", {}), ("openvino", {})]
    rows, reference = [], None
    for label, options in variants:
        engine_name = label.split()[0]
        try:
            if engine_name == "torch":
                engine = make_engine("torch", predictor, **options)
            else:
                engine = make_engine(engine_name, predictor, model_dir=model_dir, folds=[0])
            engine.load_fold(0)
            with torch.inference_mode():
                for _ in range(2):
                    engine(tile)
                start = time.perf_counter()
                for _ in range(repeats):
                    engine(tile)
                seconds = (time.perf_counter() - start) / repeats
            labels = [predict_bounded(predictor, image, props, engine=engine) for image, props in volumes]
        except Exception as error:  # a missing package or an export failure is a row, not a crash
            rows.append({"model": name, "engine": label, "error": f"{type(error).__name__}: {error}"[:120]})
            continue
        if reference is None:
            reference = labels
        differing = sum(int(np.count_nonzero(a != b)) for a, b in zip(labels, reference))
        voxels = sum(int(a.size) for a in reference)
        rows.append({"model": name, "engine": label, "patch": "x".join(map(str, patch)), "seconds": seconds,
                     "differing": differing, "voxels": voxels})
        print(rows[-1], flush=True)
    for row in rows:
        if "seconds" in row:
            row["speedup"] = rows[0]["seconds"] / row["seconds"]
    return rows


def hippocampus_volumes(count: int = 3):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    paths = sorted((HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))[:count]
    return [SimpleITKIO().read_images([str(p)]) for p in paths]


# ----------------------------------------------------------------------------------------------
# Report


def report(args, shape, results, engines, tiles, elapsed, load) -> str:
    stock, cli = results["stock"], results["cli"]
    command = " ".join(["python benchmarks/bench_large_volumes.py", f"--shape {args.shape}",
                        f"--budget-gb {args.budget_gb:g}"] + (["--quick"] if args.quick else []))
    lines = [
        f"`{command}` on {platform.machine()}, {os.cpu_count()} cores shared with other work (1-min load "
        f"average {load} at the start), CPU only, whole script {elapsed / 60:.1f} min.",
        "",
        f"Volume: generated CT-like {'x'.join(map(str, shape))} (z, y, x) at 0.8 mm, int16 as CT is stored "
        f"({np.prod(shape) / 1e6:.0f} M voxels); model: nnU-Net 3d_fullres trained a few epochs on 8 generated "
        f"CT-like cases at {TRAIN_SPACING} mm (3 classes), {tiles} tiles, no mirroring, one fold."
        + ("" if args.shape == "512x512x400" else
           f" **Scaled down** from the issue's 512x512x400 so that the four runs fit the shared machine."),
        "",
        "Each method runs in a fresh process; peak RSS is the whole process's (``wait4``), which includes what "
        "every method holds before the call: torch, the model and the image read by nnU-Net's SimpleITKIO "
        "(float32), and that reader's own peak.",
        "",
        "| method | wall time (s) | peak RSS (GB) | RSS before the call (GB) | peak vs in-memory stock "
        "| labels differing from stock in-memory |",
        "|---|---|---|---|---|---|",
    ]
    names = {"cli": "`nnUNetv2_predict` (whole command)", "stock": "nnU-Net in-memory `predict_single_npy_array`",
             "ours": "ours, no budget", "budget": f"ours, `max_memory_gb={args.budget_gb:g}`"}
    for key in ("cli", "stock", "ours", "budget"):
        entry = results[key]
        before = f"{entry['rss_before'] / GB:.2f}" if entry.get("rss_before") else "-"
        lines.append(f"| {names[key]} | {entry['seconds']:.1f} | {entry['peak_rss'] / GB:.2f} | {before} | "
                     f"{entry['peak_rss'] / stock['peak_rss']:.2f}x | {entry['differing']} of {entry['voxels']} |")
    peak_ours = max(results["ours"]["peak_rss"], results["budget"]["peak_rss"])
    slowest = max(results["ours"]["seconds"], results["budget"]["seconds"])
    equal = results["ours"]["differing"] == 0 and results["budget"]["differing"] == 0
    half = peak_ours <= stock["peak_rss"] / 2 and peak_ours <= cli["peak_rss"] / 2
    lines += ["",
              f"- Goal: peak RSS at most 4 GB: **{'met' if peak_ours <= 4 * GB else 'not met'}** "
              f"({peak_ours / GB:.2f} GB, process total including torch and the model).",
              f"- Goal: at most half of stock's: **{'met' if half else 'not met'}** "
              f"(ours {results['ours']['peak_rss'] / GB:.2f} / budgeted {results['budget']['peak_rss'] / GB:.2f} GB "
              f"vs stock in-memory {stock['peak_rss'] / GB:.2f} GB ({peak_ours / stock['peak_rss']:.2f}x) and "
              f"`nnUNetv2_predict` {cli['peak_rss'] / GB:.2f} GB ({peak_ours / cli['peak_rss']:.2f}x)).",
              f"- Goal: identical labels: **{'met' if equal else 'not met'}** "
              f"({results['ours']['differing']} and {results['budget']['differing']} differing voxels; "
              f"`nnUNetv2_predict` {cli['differing']}).",
              f"- Goal: wall time no worse than stock's: **{'met' if slowest <= stock['seconds'] else 'not met'}** "
              f"(ours {results['ours']['seconds']:.1f} / {results['budget']['seconds']:.1f} s vs "
              f"{stock['seconds']:.1f} s in memory, {cli['seconds']:.1f} s for the command).",
              "- Ours preprocesses in slabs (AutoNNUNetLib/bounded/preprocess.py, equal to nnU-Net's "
              "DefaultPreprocessor bit for bit), predicts tiles into float16 sums and exports in slabs; stock "
              "holds float copies of the input (about 34 bytes per input voxel) and classes x voxels arrays on "
              "the original grid.",
              "- A budget is a ceiling the planner fills, not a saving: without one the slabs are about 512 MB, "
              f"so `max_memory_gb={args.budget_gb:g}` may use more than no budget (here "
              f"{(results['budget']['peak_rss'] - results['budget']['rss_before']) / GB:.2f} vs "
              f"{(results['ours']['peak_rss'] - results['ours']['rss_before']) / GB:.2f} GB above what the process "
              "held before the call); it caps the peak, e.g. on a small machine.",
              "",
              "Seconds per tile (one tile forward, no mirroring, after 2 warm-up calls; label maps of the bounded "
              "path with each engine vs the torch engine on the listed volumes):",
              "",
              "| model | engine | tile | s/tile | speed vs torch | labels differing from torch |",
              "|---|---|---|---|---|---|"]
    fastest_equal = None
    for row in engines:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['engine']} | - | - | - | {row['error']} |")
            continue
        lines.append(f"| {row['model']} | {row['engine']} | {row['patch']} | {row['seconds']:.3f} | "
                     f"{row['speedup']:.2f}x | {row['differing']} of {row['voxels']} "
                     f"({row['differing'] / row['voxels']:.1e}) |")
        if row["differing"] == 0 and row["engine"] != "torch" and row["speedup"] >= 1.5:
            fastest_equal = row
    best = max((r for r in engines if "speedup" in r and r["engine"] != "torch"), key=lambda r: r["speedup"],
               default=None)
    lines += ["",
              f"- Goal: a CPU engine at least 1.5x faster per tile than torch with equal labels: "
              f"**{'met' if fastest_equal else 'not met'}**"
              + (f" ({best['engine']} on {best['model']}: {best['speedup']:.2f}x, {best['differing']} differing voxels)."
                 if best else "."),
              "- The CPU default engine stays torch unless this table shows an engine faster with equal labels "
              "on every model (`AutoNNUNetLib.engines.CPU_DEFAULT`)."]
    return "\n".join(lines)


def main() -> int:
    if "--peak" in sys.argv:
        peak_wrapper()
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512x512x400", help="large volume (z x y x x) at 0.8 mm")
    parser.add_argument("--budget-gb", type=float, default=1.0)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--hippocampus-model", type=Path, default=None, help="a trained hippocampus model folder")
    parser.add_argument("--child", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--image", default=None)
    parser.add_argument("--output", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="shared-machine mode: train the CT model 2 epochs x 5 iterations, no searched model")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not write docs")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.image, args.output, args.budget_gb)
        return 0

    started = time.perf_counter()
    load = f"{os.getloadavg()[0]:.1f}"
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_large_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, nnUNet_n_proc_DA="0", nnUNet_compile="false")
    os.environ.update(nnUNet_n_proc_DA="0", nnUNet_compile="false")
    shape = tuple(int(v) for v in args.shape.split("x"))

    ct_source = make_ct_dataset(work / "ct_source")
    ct_model = train_model(ct_source, work, 501, "CTLike", epochs=2 if args.quick else 4,
                           iterations=5 if args.quick else 10)
    image_path = work / "large_0000.nii.gz"
    if not image_path.exists():
        image, _ = ct_like(shape, 0.8, seed=100)
        write_volume(image, 0.8, image_path)
        del image
    predictor = _load(str(ct_model))
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from AutoNNUNetLib.bounded import plan_prediction

    image, properties = SimpleITKIO().read_images([str(image_path)])
    plan = plan_prediction(predictor, image.shape, properties, args.budget_gb)
    print(plan.summary(), flush=True)
    del image
    results = measure_methods(ct_model, image_path, work, args.budget_gb, env)

    from AutoNNUNetLib.config import TrialConfig

    ct_small = ct_like((120, 160, 160), 0.8, seed=7)[0][None].astype(np.float32)
    ct_props = {"spacing": [0.8, 0.8, 0.8]}
    engines = engine_rows("CT-like default", ct_model, [(ct_small, ct_props)])
    if args.hippocampus_model or not args.quick:
        hippo_default = args.hippocampus_model or train_model(HIPPOCAMPUS, work, 4, "Hippocampus", epochs=1,
                                                              iterations=5)
        hippocampus = hippocampus_volumes()
        engines = engine_rows("hippocampus default", hippo_default, hippocampus) + engines
    if not args.quick:
        hippo_searched = train_model(HIPPOCAMPUS, work, 4, "Hippocampus",
                                     TrialConfig(encoder_type="residual", base_num_features=39, max_features=378),
                                     epochs=1, iterations=5)
        engines += engine_rows("hippocampus searched (residual, 39-378 features)", hippo_searched,
                               hippocampus_volumes())
    section = report(args, shape, results, engines, plan.tiles, time.perf_counter() - started, load)
    print(section)
    if not args.no_write:
        from _report import write_section

        write_section(TITLE, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
