"""The trainable parameters and their gradients as views of one flat buffer per optimizer group.

A QLoRA step updates a few hundred small LoRA tensors (448 on a 7B Llama). Per tensor, bitsandbytes' optimizer
launches its update kernel and synchronizes the device, and clipping and zeroing walk the list again: on a
GPU whose forward and backward are one replayed CUDA graph (``train.cuda_graph``), that host work is most
of what is left between two steps. Here every parameter's ``.data`` and ``.grad`` are views into one flat
buffer per group (weight-decayed matrices, undecayed vectors; per dtype where a group mixes dtypes), so the
optimizer steps one tensor per buffer, clipping reads one norm per buffer, zeroing is one fill and a DDP all-reduce runs in place.

Checkpoints keep the per-parameter optimizer format: ``state_dict``/``load_state_dict`` split and join
the flat state, so a run resumes whichever layout wrote it. Only optimizers whose state is elementwise are
stepped flat (AdamW in 32 bits); the 8-bit optimizer's block-quantized state stays per parameter, over the
same views.
"""

from __future__ import annotations

from typing import Any

import torch

ELEMENTWISE_OPTIMIZERS = ("adamw_torch", "paged_adamw_32bit")


def decay_groups(params: list[torch.nn.Parameter]) -> list[tuple[list[torch.nn.Parameter], bool]]:
    """The optimizer's groups in order: (matrices, weight decay), (vectors, no weight decay); empty ones left out."""
    groups = [([p for p in params if p.ndim >= 2], True), ([p for p in params if p.ndim < 2], False)]
    return [(ps, decays) for ps, decays in groups if ps]


class FlatParameters:
    """Views ``params`` (and gradients, zeroed) into flat buffers: one per :func:`decay_groups` group, or per
    dtype within a group that mixes dtypes.

    ``flats`` are the flat parameters (``torch.nn.Parameter``s whose ``.grad`` is the flat gradient); ``groups``
    the original parameters per decay group, as an optimizer over them would hold them. The gradients stay
    allocated: backward passes accumulate into them in place and :meth:`zero_grad` fills them with zeros."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.groups: list[tuple[list[torch.nn.Parameter], bool]] = decay_groups(params)
        self.flats: list[torch.nn.Parameter] = []
        self.flat_group: list[int] = []  # each flat's decay group
        self.where: list[tuple[int, int]] = []  # each parameter (in the groups' order): its flat and offset
        for gi, (ps, _) in enumerate(self.groups):
            buckets: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
            for p in ps:
                buckets.setdefault((p.dtype, p.device), []).append(p)
            first = len(self.flats)
            for (dtype, device), members in buckets.items():
                data = torch.empty(sum(p.numel() for p in members), dtype=dtype, device=device)
                grad = torch.zeros_like(data)
                offset = 0
                for p in members:
                    n = p.numel()
                    data[offset:offset + n].copy_(p.detach().reshape(-1))
                    p.data = data[offset:offset + n].view_as(p)
                    p.grad = grad[offset:offset + n].view_as(p)
                    offset += n
                flat = torch.nn.Parameter(data)
                flat.grad = grad
                self.flats.append(flat)
                self.flat_group.append(gi)
            for p in ps:
                b = first + list(buckets).index((p.dtype, p.device))
                self.where.append((b, (p.data.data_ptr() - self.flats[b].data_ptr()) // p.element_size()))

    @property
    def grads(self) -> list[torch.Tensor]:
        return [f.grad for f in self.flats]

    def optimizer_groups(self, optimizer: str) -> list[tuple[list[torch.nn.Parameter], bool]]:
        """What the optimizer steps: the flat parameters where its state is elementwise, else the originals."""
        if optimizer in ELEMENTWISE_OPTIMIZERS:
            return [([f], self.groups[gi][1]) for f, gi in zip(self.flats, self.flat_group, strict=True)]
        return self.groups

    def stepped_flat(self, optimizer: torch.optim.Optimizer) -> bool:
        return optimizer.param_groups[0]["params"][0] is self.flats[0]

    def zero_grad(self) -> None:
        for g in self.grads:
            g.zero_()

    def _params(self) -> list[tuple[int, torch.nn.Parameter]]:
        """Every parameter with its decay group, in the order (and so with the index) an optimizer holds it."""
        return [(gi, p) for gi, (ps, _) in enumerate(self.groups) for p in ps]

    def state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state in the per-parameter format (what an optimizer over the originals saves)."""
        sd = optimizer.state_dict()
        if not self.stepped_flat(optimizer):
            return sd
        state = {}
        for i, ((_, p), (b, offset)) in enumerate(zip(self._params(), self.where, strict=True)):
            if b in sd["state"]:
                state[i] = _split(sd["state"][b], offset, self.flats[b], p)
        groups, index = [], 0
        for gi, (ps, _) in enumerate(self.groups):
            hyper = sd["param_groups"][self.flat_group.index(gi)]
            groups.append({**hyper, "params": list(range(index, index + len(ps)))})
            index += len(ps)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        """Load a per-parameter optimizer state (see :meth:`state_dict`)."""
        if not self.stepped_flat(optimizer):
            optimizer.load_state_dict(sd)
            return
        if [len(g["params"]) for g in sd["param_groups"]] != [len(ps) for ps, _ in self.groups]:
            raise ValueError("the optimizer state's parameter groups do not match the model's trainable parameters")
        ids = [i for g in sd["param_groups"] for i in g["params"]]
        state, groups = {}, []
        for b, gi in enumerate(self.flat_group):
            members = [(i, p) for i, ((_, p), (fb, _)) in zip(ids, zip(self._params(), self.where, strict=True),
                                                               strict=True) if fb == b]
            per = [sd["state"].get(i) for i, _ in members]
            if all(s is not None for s in per):
                state[b] = _join(per, [p for _, p in members])
            elif any(s is not None for s in per):
                raise ValueError("the optimizer state covers only some parameters of a flat buffer")
            groups.append({**sd["param_groups"][gi], "params": [b]})
        optimizer.load_state_dict({"state": state, "param_groups": groups})


def _split(value: Any, offset: int, flat: torch.Tensor, p: torch.Tensor) -> Any:
    """One parameter's slice of a flat state value (nested dicts followed); others, like the step count, are
    every parameter's."""
    if isinstance(value, dict):
        return {k: _split(v, offset, flat, p) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        if value.shape == flat.shape:
            return value[offset:offset + p.numel()].view(p.shape).clone()
        return value.clone()
    return value


def _join(values: list[Any], ps: list[torch.nn.Parameter]) -> Any:
    """The flat state value of one group from its parameters' values (inverse of :func:`_split`)."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _join([v[k] for v in values], ps) for k in first}
    if isinstance(first, torch.Tensor) and all(v.shape == p.shape for v, p in zip(values, ps, strict=True)):
        return torch.cat([v.reshape(-1) for v in values])
    return first.clone() if isinstance(first, torch.Tensor) else first
