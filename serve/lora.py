"""LoRA adapters on the device, for mixed-adapter decode steps.

Per layer and fused projection group (q/k/v, output, gate/up, down) the pool holds ``A`` [slots, R, in] and
``B`` [slots, out, R]: part j of a group (q, k, v ...) owns rows ``j*r .. j*r + r_j`` of ``A`` and, in ``B``, its
output rows times the same columns (block-diagonal), with the adapter's scale (alpha / r, or alpha / sqrt(r)
for rsLoRA) folded into ``B``. A step adds every token's delta with two kernel launches per group
(``kernels.lora_shrink`` / ``lora_expand``) whatever the mix of adapters; tokens without one are left alone.

Adapters are read from their PEFT directories on a loader thread (never the decode thread) into a free slot,
the least recently used idle slot when none is free; a slot is idle once no running sequence uses it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from serve.families import PARTS

log = logging.getLogger(__name__)


def adapter_rank(path: str | Path) -> int:
    return int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


class AdapterPool:
    """``slots`` adapters resident at once out of ``paths`` (served name -> PEFT directory)."""

    def __init__(self, paths: dict[str, str], slots: int, shapes: list[dict[str, tuple[int, list[int]]]],
                 device: torch.device, dtype: torch.dtype):
        self.paths, self.slots, self.device, self.dtype = dict(paths), slots, device, dtype
        self.rank = max((adapter_rank(p) for p in paths.values()), default=1)
        self.pools: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        for layer in shapes:  # group -> (in features, out features of each part)
            groups = {}
            for g, (fan_in, outs) in layer.items():
                r = _pow2(self.rank * len(outs))
                groups[g] = (torch.zeros(slots, r, fan_in, device=device, dtype=dtype),
                             torch.zeros(slots, sum(outs), r, device=device, dtype=dtype))
            self.pools.append(groups)
        self.outs = shapes
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # loaded adapters, least recently used first
        self.users = [0] * slots
        self.loading: set[str] = set()
        self.reserved: set[int] = set()  # slots being written by a load
        self.lock = threading.Lock()
        self.loads = 0

    def __contains__(self, name: str) -> bool:
        return name in self.paths

    def acquire(self, name: str) -> int | None:
        """The slot of adapter ``name`` for one more sequence, or None while it loads (a load is started)."""
        with self.lock:
            slot = self.slot_of.get(name)
            if slot is not None:
                self.slot_of.move_to_end(name)
                self.users[slot] += 1
                return slot
            if name not in self.loading and self._victim() is not None:
                self.loading.add(name)
                threading.Thread(target=self._load, args=(name,), name=f"lora-load-{name}", daemon=True).start()
        return None

    def release(self, slot: int) -> None:
        with self.lock:
            self.users[slot] -= 1

    def _victim(self) -> int | None:
        """A free slot, else the least recently used one no sequence uses (the caller holds the lock)."""
        taken = set(self.slot_of.values()) | self.reserved
        free = [s for s in range(self.slots) if s not in taken]
        if free:
            return free[0]
        return next((s for s in self.slot_of.values() if self.users[s] == 0 and s not in self.reserved), None)

    def _load(self, name: str) -> None:
        try:
            weights = self._read(name)
            with self.lock:
                slot = self._victim()
                if slot is None:  # every slot got busy meanwhile: a later request tries again
                    return
                self.reserved.add(slot)
                for n, s in list(self.slot_of.items()):
                    if s == slot:
                        del self.slot_of[n]
            try:
                self._copy(slot, weights)
            finally:
                with self.lock:
                    self.reserved.discard(slot)
            with self.lock:
                self.slot_of[name] = slot
                self.loads += 1
            log.info("adapter %s loaded into slot %d", name, slot)
        except Exception:  # noqa: BLE001 (the request waiting on it is answered by the engine)
            log.exception("adapter %s failed to load", name)
        finally:
            with self.lock:
                self.loading.discard(name)

    def _read(self, name: str) -> dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]]:
        """(layer, group, part) -> (A [r, in], B [out, r] * scale) of the adapter's PEFT files, on the host."""
        from safetensors.torch import load_file

        path = Path(self.paths[name])
        conf = json.loads((path / "adapter_config.json").read_text())
        r, alpha = int(conf["r"]), float(conf["lora_alpha"])
        scale = alpha / (r ** 0.5) if conf.get("use_rslora") else alpha / r
        state = load_file(str(path / "adapter_model.safetensors"))
        index = {part: (g, j) for g, parts in PARTS.items() for j, part in enumerate(parts)}
        out = {}
        for key, a in state.items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            layer = int(module.split(".layers.")[1].split(".")[0])
            part = module.rsplit(".", 1)[1]
            if part not in index:
                raise ValueError(f"{path}: adapter on {part}: the engine applies adapters to the attention and MLP "
                                 "projections only")
            b = state[key.replace(".lora_A.", ".lora_B.")]
            g, j = index[part]
            out[(layer, g, j)] = (a.float(), b.float() * scale)
        return out

    def _copy(self, slot: int, weights) -> None:
        stream = torch.cuda.Stream() if self.device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
            for layer, groups in enumerate(self.pools):
                for g, (a_pool, b_pool) in groups.items():
                    a_pool[slot].zero_()
                    b_pool[slot].zero_()
                    outs = self.outs[layer][g][1]
                    for j in range(len(outs)):
                        if (layer, g, j) not in weights:
                            continue
                        a, b = weights[(layer, g, j)]
                        r = a.shape[0]
                        row, col = j * self.rank, sum(outs[:j])
                        a_pool[slot, row:row + r].copy_(a.to(self.dtype), non_blocking=True)
                        b_pool[slot, col:col + outs[j], row:row + r].copy_(b.to(self.dtype), non_blocking=True)
        if stream:
            stream.synchronize()

    def report(self) -> dict:
        with self.lock:
            return {"adapters": sorted(self.paths), "adapter_slots": self.slots, "adapters_loaded": list(self.slot_of),
                    "adapter_loads": self.loads, "adapter_rank": self.rank}

