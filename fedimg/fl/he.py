"""Homomorphic encryption (``privacy.encryption: he``): decrypt the federation's model at a site.

With HE the server stores only CKKS ciphertexts (``FL_global_model.pt``
holds serialized TenSEAL vectors). The secret key is in each site's startup
kit (``startup/client_context.tenseal``, written by provisioning), so only a
site can turn the final global model back into weights, with
:func:`decrypt_global_model`.

The checkpoint comes from the server: it is read with PyTorch's restricted
unpickler (:func:`fedimg.training.checkpoint.load_checkpoint`), never with
plain pickle. NVFlare's ``PTFileModelPersistor`` writes it as
``{"model": {name: bytes (a serialized CKKS vector) or tensor}, "meta_props":
{"processed_algorithm": "CKKS", "processed_keys": {name: bool}}}``: bytes,
strings, booleans and tensors only, all of which the restricted unpickler
reads without any extra allowed type.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedimg.training.checkpoint import load_checkpoint

CLIENT_CONTEXT = "client_context.tenseal"


def _context_file(site_kit: Path) -> Path:
    for cand in (site_kit / "startup" / CLIENT_CONTEXT, site_kit / CLIENT_CONTEXT):
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"no {CLIENT_CONTEXT} in {site_kit}/startup: expected a site startup kit provisioned "
        "with HE (nvflare poc prepare -he, or the HE builder in project.yml)"
    )


def decrypt_global_model(checkpoint: str | Path, site_kit: str | Path, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Decrypt an HE job's global model with a site's secret key, shaped like ``net``'s state dict.

    Args:
        checkpoint: the server's ``FL_global_model.pt`` of an HE job.
        site_kit: a site's startup kit folder (holds ``startup/client_context.tenseal``).
        net: the experiment's network (``build_model``), for names, shapes and dtypes.

    Raises:
        FileNotFoundError: the kit has no HE context.
        ValueError: the checkpoint is not an HE model of this network, or holds
            anything but tensors, bytes, numbers and strings (refused unread).
    """
    import tenseal as ts

    context = ts.context_from(_context_file(Path(site_kit)).read_bytes())
    if not context.has_secret_key():
        raise ValueError(f"{site_kit} holds a public HE context only (a server's): decrypt with a site's kit")
    saved = load_checkpoint(checkpoint)  # ciphertexts are bytes: no object of the server's is unpickled
    params = saved.get("model", saved) if isinstance(saved, dict) else None
    if not isinstance(params, dict):
        raise ValueError(f"{checkpoint} is not a model checkpoint")
    expected = net.state_dict()
    missing = sorted(set(expected) - set(params))
    if missing:
        raise ValueError(f"{checkpoint} does not match the configured network: missing {missing[:3]}")
    out = {}
    for name, ref in expected.items():
        value = params[name]
        if isinstance(value, bytes):
            flat = torch.tensor(ts.ckks_vector_from(context, value).decrypt(), dtype=torch.float64)
        elif isinstance(value, torch.Tensor) and not value.is_complex() and value.dtype != torch.bool:
            flat = value.to(torch.float64).reshape(-1)
        else:
            raise ValueError(
                f"{checkpoint}: {name} is a {type(value).__name__}, expected a ciphertext (bytes) or a tensor"
            )
        if flat.numel() != ref.numel():
            raise ValueError(f"{name}: {flat.numel()} values decrypted, the network expects {ref.numel()}")
        if not torch.isfinite(flat).all():
            raise ValueError(
                f"{checkpoint}: {name} decrypts to NaN or infinite values; the global model is "
                "broken or was not encrypted with this federation's key"
            )
        out[name] = flat.reshape(ref.shape).to(ref.dtype)
    return out


__all__ = ["decrypt_global_model"]
