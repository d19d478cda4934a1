"""A CPU model actor for a self-hosted NDIF (ndif==0.1.2) on a machine without a GPU.

ndif's default actor places the weights with CUDA calls (`torch.cuda.set_device`, `synchronize`,
`empty_cache`), which fail without an NVIDIA driver. This subclass loads the model on the CPU with
gradients off and replaces the CUDA-only steps; the request handling (`run`, `execute`) is ndif's own.
It touches ndif internals, which is why the server venv pins ndif exactly (ndif/requirements.txt).
Ray's workers import it by name: `make ndif-up` puts this directory on their PYTHONPATH and names
`ndif_cpu_actor.CPUModelActor` as the deployment's `actor_class`.
"""
from __future__ import annotations

import gc
import logging

import ray
from nnsight.modeling.huggingface import HuggingFaceModel

from ndif.services.ray.deployments.modeling.base import BaseModelDeployment

logger = logging.getLogger("ndif.modeling.cpu")


class CPUModelDeployment(BaseModelDeployment):
    """ndif's model actor with the weights on the CPU."""

    CACHEABLE = False  # no GPU to free: the controller evicts instead of parking weights on the CPU

    def load_from_disk(self) -> HuggingFaceModel:
        # The controller hands every replica a (declared) GPU budget; with no CUDA the per-GPU
        # accounting in ndif's run() must see none, or it calls into CUDA.
        self.gpu_mem_bytes_by_id = {}
        model = HuggingFaceModel.from_model_key(self.model_key, dispatch=True, dtype=self.dtype_name, **self.kwargs)
        model._module.requires_grad_(False).eval()
        logger.info("loaded %s on the CPU", self.model_key)
        return model

    async def to_cache(self) -> None:
        await self.cancel()  # nothing to move: the weights already live in CPU memory

    def from_cache(self, gpu_mem_bytes_by_id) -> None:
        self.cached = False

    def cleanup(self) -> None:
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


CPUModelActor = ray.remote(num_cpus=1, max_restarts=-1)(CPUModelDeployment)
