"""Lesson 03's resume recipe, pasted alone into fresh processes, resumes a run bit for bit (issue 16's bar).

The recipe cell (tag `recipe`, the one defining `save_training_state`) is written to a module of its own, as a
project would paste it. One process trains uninterrupted and, separately, trains until a simulated crash; a
second, fresh process (seeded differently) resumes from the last checkpoint. The run has a warm-up + cosine
scheduler, an AMP-off GradScaler, dropout and BatchNorm, random augmentation from torch, Python and NumPy,
and a shuffling loader; the final weights must equal the uninterrupted run's exactly (torch.equal).
"""
import os
import subprocess
import sys

import pytest
import torch

from notebook_utils import NOTEBOOK_DIR, read, tagged

NOTEBOOK = NOTEBOOK_DIR / "03_save_load.ipynb"
EPOCHS, BATCHES_PER_EPOCH = 3, 6  # 90 samples in batches of 16: the last batch of each epoch holds 10

DRIVER = r'''
import random
import sys
import warnings

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from resume_recipe import load_training_state, restore_rng_states, rng_states, train

mode, kind, out = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(1)


class NoisyData(Dataset):
    """Random augmentation from torch, Python and NumPy: each RNG must be restored for the runs to match."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(90, 6, generator=g), torch.randint(0, 3, (90,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        noise = 0.1 * torch.randn(6) + float(np.random.normal(0, 0.1)) + random.gauss(0, 0.1)
        return self.x[i] + noise, self.y[i]


def build(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    if kind == "default":  # DataLoader(shuffle=True) as most code writes it: no generator of its own
        loader = DataLoader(NoisyData(), batch_size=16, shuffle=True)
    else:
        loader = DataLoader(NoisyData(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(7),
                            num_workers=2 if kind == "workers" else 0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=4),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=14)], milestones=[4])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, optimizer, scheduler, scaler, loader


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


if mode == "crash":
    model, *rest = build(0)
    straight = train(model, *rest, epochs=EPOCHS, checkpoint="straight.pt")
    torch.save({"weights": weights(model), "log": straight}, out + ".straight")
    model, *rest = build(0)
    train(model, *rest, epochs=EPOCHS, checkpoint="resume.pt", save_every_steps=SAVE_EVERY, stop_after_step=STOP)
elif mode == "resume":
    model, *rest = build(123)  # a fresh process, seeded differently: only the checkpoint carries the state
    resumed = train(model, *rest, epochs=EPOCHS, checkpoint="resume.pt", resume=True)
    torch.save({"weights": weights(model), "log": resumed}, out)
elif mode == "cuda-map":  # a checkpoint from a machine with one more GPU than this one
    present = torch.cuda.device_count()
    states = rng_states()
    states["cuda"] = ([torch.cuda.get_rng_state(i) for i in range(present)] + [torch.cuda.get_rng_state(0)]
                      if present else [torch.zeros(16, dtype=torch.uint8)])
    before = torch.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restore_rng_states(states)
    assert torch.equal(torch.get_rng_state(), before)
    print(present, "|", "; ".join(str(w.message) for w in caught))
'''


def resume_recipe() -> str:
    cells = [cell.source for cell in tagged(read(NOTEBOOK), "recipe") if "def save_training_state" in cell.source]
    assert len(cells) == 1, f"{NOTEBOOK.name}: expected one recipe cell defining save_training_state, found {len(cells)}"
    return cells[0]


def run(tmp_path, *args, constants=""):
    (tmp_path / "resume_recipe.py").write_text(resume_recipe())  # the cell as it stands, pasted into a module
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    source = f"EPOCHS = {EPOCHS}\n{constants}\n{DRIVER}"
    result = subprocess.run([sys.executable, "-W", "error", "-c", source, *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result.stdout


# (loader kind, save every N steps, crash after step) -> the checkpoint resumed from is at (epoch, batch)
CASES = {
    "mid-epoch, loader with its own generator": ("generator", 4, 11, (1, 2)),
    "mid-epoch, default DataLoader(shuffle=True)": ("default", 4, 11, (1, 2)),
    "mid-epoch, two loader workers": ("workers", 5, 11, (1, 4)),
    "at an epoch's end": ("generator", 0, 10, (1, 0)),
}


@pytest.mark.parametrize("kind,save_every,stop,position", CASES.values(), ids=CASES.keys())
def test_pasted_recipe_resumes_bit_for_bit(kind, save_every, stop, position, tmp_path):
    constants = f"SAVE_EVERY, STOP = {save_every}, {stop}"
    run(tmp_path, "crash", kind, "out.pt", constants=constants)
    progress = torch.load(tmp_path / "resume.pt", weights_only=True)["progress"]
    assert (progress["epoch"], progress["batch"]) == position  # resumed from where the case says (mid-epoch or not)
    run(tmp_path, "resume", kind, "out.pt", constants=constants)
    straight = torch.load(tmp_path / "out.pt.straight", weights_only=True)
    resumed = torch.load(tmp_path / "out.pt", weights_only=True)
    done = progress["step"]
    assert len(straight["log"]) == EPOCHS * BATCHES_PER_EPOCH and len(resumed["log"]) == len(straight["log"]) - done
    assert resumed["log"] == straight["log"][done:], "steps after the resume differ (loss or learning rate)"
    assert straight["weights"].keys() == resumed["weights"].keys()
    differ = [k for k in straight["weights"] if not torch.equal(straight["weights"][k], resumed["weights"][k])]
    assert not differ, f"final weights differ from the uninterrupted run's: {differ}"


def test_cuda_rng_states_map_onto_a_machine_with_fewer_gpus(tmp_path):
    present, message = run(tmp_path, "cuda-map", "generator", "unused").strip().split(" | ")
    saved = int(present) + 1
    assert (f"the checkpoint holds {saved} CUDA RNG state(s), this machine has {present} GPU(s): "
            f"restored {present}") in message
