"""Pure per-unit computations: tensors in, tensors and a report out, no I/O.

* :func:`~oftmerge.kernels.merge.merge_module` — one module's generators merged in so(b);
* :func:`~oftmerge.kernels.fold.fold_weight` — one base weight folded with an adapter's rotation;
* :func:`~oftmerge.kernels.decouple.decouple_weight` and :func:`~oftmerge.kernels.decouple.merge_residuals`
  — one weight of several experts decoupled, and merged.
"""
