"""invaspread: the Invariant and Spreading instance loss (Ye et al., CVPR 2019).

The loss itself lives in the Rust crate of the same name; this package makes it a PyTorch op:

    import invaspread.torch as ist
    loss = ist.instance_loss(z, tau=0.1)   # z: (2m, d), rows i and i + m two views of image i
    loss.backward()

`invaspread.torch` imports torch; this module does not.
"""

from ._native import CPU_VERSIONS, CUDA_VERSIONS, __version__

__all__ = ["CPU_VERSIONS", "CUDA_VERSIONS", "__version__"]
