"""The fused perturbation API: ``ParamSet`` (in place, exact restore, out-of-place copies) and the single-tensor
fills ``fill_normal_`` / ``fill_sign_``. Bottom to top: ``plan`` (group plans) < ``copy`` < ``paramset``."""
from .paramset import ParamSet
from .plan import fill_normal_, fill_sign_, split_named

__all__ = ["ParamSet", "fill_normal_", "fill_sign_", "split_named"]
