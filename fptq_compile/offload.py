"""Models bigger than memory: decoder blocks left on disk (or on GPUs) and read one at a time.

:func:`load_offloaded` loads a Hugging Face checkpoint folder (safetensors) through
transformers' ``device_map``, which hands the placement to ``accelerate``: what lies
outside the decoder blocks (embeddings, final norm, lm_head) is read into memory, each
block stays on ``"disk"`` (its parameters are ``meta`` tensors, read from the
memory-mapped checkpoint when the block runs and dropped after). The model still runs as
a whole, one block's weights in memory at a time. Given a memory budget per device
(``max_memory``), accelerate places the blocks on the GPUs, then in CPU memory, the rest on
disk (:func:`placed_blocks`).

:func:`block_in_memory` gives one block as a plain module (no offload hooks) holding its
weights on the device it computes on (:func:`execution_device`), for the compiler to
capture, bind and quantize; the copy is dropped with the reference to it. A block held in
memory is returned as it is, or, where accelerate placed it (and hooked it), as a copy
without the hooks sharing its tensors.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import itertools
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from accelerate import infer_auto_device_map, init_empty_weights
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import align_module_device, has_offloaded_params
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx, nn

from fptq_compile.blocks import find_blocks
from fptq_compile.capture import CapturedModel, capture, graph_attribute
from fptq_compile.errors import ModelLoadError, UnsupportedGraphError
from fptq_compile.graph_utils import attribute_targets, fetch_tensor, replace_tensor
from fptq_compile.models import LoadedModel

Budget = Mapping[int | str, int | str]
"""accelerate's ``max_memory``: bytes (or ``"70GiB"``) per GPU index and for ``"cpu"``."""


def load_offloaded(folder: str | os.PathLike[str], max_memory: Budget | None = None) -> LoadedModel:
    """Load the causal LM in ``folder`` (a Hugging Face checkpoint in safetensors) with its
    decoder blocks on disk: memory holds only what lies outside them. With ``max_memory``
    the blocks fill the GPUs' and the CPU's budgets first (:func:`placed_blocks`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: offloaded loading needs a Hugging Face checkpoint folder")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no .safetensors file: offloaded loading reads safetensors checkpoints")
    try:
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
        device_map = blocks_on_disk(skeleton) if max_memory is None else placed_blocks(skeleton, max_memory)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device_map)
        tokenizer = _tokenizer(path)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        reason = f"{type(error).__name__}: {error}"
        raise ModelLoadError(f"could not load {path} with its blocks on disk: {reason}") from error
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(path))


def _tokenizer(path: Path) -> object | None:
    """The folder's tokenizer, or None when it has none (synthetic checkpoints)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _device_map_entries(model: nn.Module) -> dict[str, bool]:
    """The entries of a ``device_map`` with one per decoder block: each block's path, and the
    path of every other module holding tensors, with whether it is a block."""
    blocks = find_blocks(model)
    entries: dict[str, bool] = {}
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        owner = name.rpartition(".")[0]
        if owner.startswith(f"{blocks.path}."):
            index = owner.removeprefix(f"{blocks.path}.").split(".")[0]
            entries[blocks.block_path(int(index))] = True
        else:
            entries[owner] = False
    return entries


def blocks_on_disk(model: nn.Module) -> dict[str, str]:
    """A ``device_map`` putting each decoder block on ``"disk"`` and every other module
    holding tensors on ``"cpu"``."""
    return {path: "disk" if is_block else "cpu" for path, is_block in _device_map_entries(model).items()}


def placed_blocks(model: nn.Module, max_memory: Budget) -> dict[str, int | str]:
    """A ``device_map`` from accelerate's placement within ``max_memory``
    (``infer_auto_device_map``, blocks never split): in model order on the GPUs, then in CPU
    memory, then on ``"disk"``, one entry per decoder block. What lies outside the blocks is
    never left on disk (the compiler keeps it in memory): accelerate's ``"disk"`` for it
    becomes ``"cpu"``."""
    blocks = find_blocks(model)
    placement = infer_auto_device_map(
        model, max_memory=dict(max_memory), no_split_module_classes=[type(blocks.layers[0]).__name__]
    )

    def placed(path: str) -> int | str:
        # accelerate names the outermost module all of whose tensors go to one device.
        parts = path.split(".")
        for prefix in (".".join(parts[:end]) for end in range(len(parts), -1, -1)):
            if prefix in placement:
                return placement[prefix]
        raise ModelLoadError(f"accelerate placed no device for {path or 'the model'}")

    device_map: dict[str, int | str] = {}
    for path, is_block in _device_map_entries(model).items():
        device = placed(path)
        device_map[path] = "cpu" if device == "disk" and not is_block else device
    return device_map


# glibc's M_MMAP_THRESHOLD: allocations from this size up get their own mapping, returned to
# the system when freed. By default glibc raises the threshold as big blocks are freed, after
# which a block's freed weights, activations and Hessians stay in a fragmented heap: measured
# on a 0.5 B-parameter Llama, peak RSS 3.74 GiB by default, 2.25 GiB with a 64 KiB threshold
# (compile 119 s against 164 s on this shared machine).
_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 64 * 1024


def return_freed_memory_at_once() -> bool:
    """Make glibc give big freed blocks back to the system at once (for the whole process,
    from now on), so that compiling block by block holds one block's memory rather than the
    heap's high-water mark. Returns whether it could (glibc only)."""
    library = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or library is None:
        return False
    mallopt = getattr(ctypes.CDLL(library), "mallopt", None)
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def is_offloaded(module: nn.Module) -> bool:
    """Whether any of ``module``'s parameters live on disk (read by accelerate when it runs)."""
    return any(has_offloaded_params(child) for child in module.modules())


def placed_off_the_cpu(model: nn.Module) -> bool:
    """Whether a device map placed any of ``model``'s tensors elsewhere than in CPU memory
    (on disk, on a GPU): then it compiles block by block, each block where it is placed."""
    return any(tensor.device.type != "cpu" for tensor in itertools.chain(model.parameters(), model.buffers()))


def execution_device(block: nn.Module) -> torch.device:
    """Where ``block`` computes: accelerate's execution device for a block it dispatched (an
    offloaded block is read there), else the device of its tensors (the CPU for none)."""
    hooks = [getattr(block, "_hf_hook", None)]
    hooks += list(getattr(hooks[0], "hooks", ()))  # a SequentialHook holds several
    for hook in hooks:
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    for tensor in itertools.chain(block.parameters(), block.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def block_in_memory(block: nn.Module, device: torch.device | None = None) -> nn.Module:
    """``block`` as a plain module holding its weights, without accelerate's hooks: an
    offloaded block is copied and its tensors read from disk onto ``device`` (default: the
    CPU); a block in memory that accelerate placed is copied sharing its tensors; any other
    block is returned as it is."""
    hooked = any(hasattr(module, "_hf_hook") for module in block.modules())
    if not is_offloaded(block):
        if not hooked:
            return block
        # The tensors are shared, not copied; the hooks (which move inputs between devices,
        # and which torch.export would trace) are dropped from the copy only.
        shared = {id(tensor): tensor for tensor in itertools.chain(block.parameters(), block.buffers())}
        plain = copy.deepcopy(block, shared)
        remove_hook_from_module(plain, recurse=True)
        return plain
    target = torch.device("cpu") if device is None else device
    plain = copy.deepcopy(block)  # meta tensors: nothing is read yet
    remove_hook_from_module(plain, recurse=True)
    state = {name: tensor.to(target) for name, tensor in block.state_dict().items() if tensor.device.type != "meta"}
    for path, child in block.named_modules():
        if not has_offloaded_params(child):
            continue
        prefix = f"{path}." if path else ""
        with align_module_device(child, target):
            own = [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]
            state.update({f"{prefix}{name}": tensor.detach() for name, tensor in own})
    plain.load_state_dict(state, assign=True, strict=True)
    return plain


class TensorStore:
    """Graph tensors kept on disk: each finished block's tensors go to one safetensors file,
    and the graph keeps a ``meta`` tensor of the same shape and dtype in their place.

    ``folder`` is created if needed; without one a temporary folder is used, deleted with
    the store.
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self._temporary = None
        if folder is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="fptq-offload-")
            folder = self._temporary.name
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, str] = {}
        """Graph attribute -> the file (in ``folder``) holding its tensor."""

    def offload(self, graph_module: fx.GraphModule, targets: Sequence[str], file_name: str) -> int:
        """Write the tensors at ``targets`` to ``file_name`` and leave meta tensors in their
        place; return the bytes written."""
        tensors = {target: fetch_tensor(graph_module, target).detach().contiguous() for target in targets}
        if not tensors:
            return 0
        staged = self.folder / f".{file_name}.partial"
        save_file(tensors, str(staged))
        os.replace(staged, self.folder / file_name)
        for target, tensor in tensors.items():
            replace_tensor(graph_module, target, torch.empty_like(tensor, device="meta"))
            self.files[target] = file_name
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())

    def load(self, target: str) -> torch.Tensor:
        """The tensor at ``target``, read from its file."""
        with safe_open(str(self.folder / self.files[target]), framework="pt") as file:
            return file.get_tensor(target)

    def materialize(self, graph_module: fx.GraphModule) -> None:
        """Read every offloaded tensor back into ``graph_module`` (for a model that fits in memory)."""
        by_file: dict[str, list[str]] = {}
        for target, file_name in self.files.items():
            by_file.setdefault(file_name, []).append(target)
        for file_name, targets in by_file.items():
            with safe_open(str(self.folder / file_name), framework="pt") as file:
                for target in targets:
                    replace_tensor(graph_module, target, file.get_tensor(target))
        self.files.clear()


def capture_offloaded(model: nn.Module) -> CapturedModel:
    """The whole graph of an offloaded causal LM, captured from an empty copy of it: the
    tensors the model holds outside its blocks are put in place (on the CPU), the blocks'
    stay ``meta``, wherever the blocks are placed (each is read when it is compiled)."""
    with init_empty_weights():
        skeleton = type(model)(model.config)
    captured = capture(skeleton)
    graph_module = captured.graph_module
    blocks = find_blocks(model)
    # The blocks are read in turn, wherever they are placed; the rest sits in the graph on the CPU.
    in_memory = {
        name: tensor.to("cpu")
        for name, tensor in model.state_dict().items()
        if tensor.device.type != "meta" and not name.startswith(f"{blocks.path}.")
    }
    for target in attribute_targets(graph_module):
        tensor = fetch_tensor(graph_module, target)
        if tensor.device.type != "meta":
            continue
        name = target.removeprefix(graph_attribute(""))
        if name in in_memory:
            replace_tensor(graph_module, target, in_memory[name])
        elif tensor.numel() == 0:  # an empty constant the export created (an empty cache)
            replace_tensor(graph_module, target, torch.empty(tensor.shape, dtype=tensor.dtype))
        elif not name.startswith(f"{blocks.path}."):
            raise UnsupportedGraphError(
                f"the captured graph reads {name}, which is neither in memory nor in a decoder block"
            )
    return captured
