"""Test configuration: float64 is enabled so that references can be exact, and the CPU shows 8
devices (``test_distributed.py``); set before JAX starts, unless XLA_FLAGS already says.

Compilation is most of the suite's time (hundreds of small programs, each run a few times), so
LLVM's optimisation level for the CPU code is lowered to 0 (``SUITE_XLA_FLAGS``): the fast set
takes about a quarter less time. XLA's own graph optimisations (fusion, layout) still run, and
the arithmetic is IEEE at every level (no fast-math), so the numbers differ from the default
build's at round-off at most, far below every tolerance here. The tests that run a user's
process (``helpers.user_environment``) drop these flags and run with JAX's defaults.
"""

import os

SUITE_XLA_FLAGS = {
    "xla_force_host_platform_device_count": "--xla_force_host_platform_device_count=8",
    "xla_backend_optimization_level": "--xla_backend_optimization_level=0",
}
for _name, _flag in SUITE_XLA_FLAGS.items():
    if _name not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


# --- `make test-fast` -----------------------------------------------------------------------------
# Whole modules and tests left out of the fast set carry `@pytest.mark.slow` (or `pytestmark`).
# These are single cases of parametrized tests (and tests whose ids are generated), left out
# because another case of the same test, or another fast test, runs the same library code: each
# costs a compilation of its own (3-20 s here), which is most of the fast set's time.
SLOW_CASES = {
    # accumulation: EKFAC's and EKFAC-ra's MLP cases and the CNN's (EKFAC) stay
    "test_accumulate.py::test_micro_batches_give_the_update_of_their_union[kfe_adam-mlp]",
    "test_accumulate.py::test_micro_batches_give_the_update_of_their_union[kfac-mlp]",
    "test_accumulate.py::test_micro_batches_with_amortized_or_one_batch_factors[one_batch_factors]",
    "test_accumulate.py::test_plain_optax_inner_is_optax_multi_steps",
    # factor_update_every: the reference test stays; the inject_hyperparams path is the same
    "test_amortized_factors.py::test_factor_update_every_through_inject_hyperparams",
    # the MLP's cases of these methods stay (same library path; the CNN's ekfac case stays too)
    "test_stacking.py::test_stacked_updates_equal_per_layer_updates[ekfac_ra-cnn]",
    "test_stacking.py::test_stacked_updates_equal_per_layer_updates[kfac-cnn]",
    "test_stacking.py::test_stacked_updates_equal_per_layer_updates[kfe_adam-cnn]",
    "test_stacking.py::test_stacked_updates_equal_per_layer_updates[kfe_adam-mlp]",
    "test_stacking.py::test_stacked_updates_equal_per_layer_updates[kfac-mlp]",
    "test_mixed_precision.py::test_bfloat16_language_model_trains_with_every_method[f32_params]",
    "test_kfe_adam.py::test_momentum_for_ekfac_is_a_trace_of_the_preconditioned_updates",
    "test_kfe_adam.py::test_kfe_adam_trains_a_tied_language_model_in_bfloat16[uncapped]",
    "test_kinds.py::test_dtype_smoke[bfloat16]",
    "test_kinds.py::test_einsum_equals_dense_general[permuted]",
    "test_mixed_precision.py::test_bfloat16_compute_update_equals_float32",
    "test_reference_updates.py::test_relative_damping_is_tikhonov_with_each_blocks_mean_scaling[sequence-ekfac]",
    "test_reference_updates.py::test_relative_damping_is_tikhonov_with_each_blocks_mean_scaling[sequence-kfac]",
    "test_nnx.py::test_nnx_twin_gives_the_linen_updates[tied]",
    "test_reference_updates.py::test_relative_damping_is_tikhonov_with_each_blocks_mean_scaling[cnn-ekfac]",
    "test_reference_updates.py::test_relative_damping_is_tikhonov_with_each_blocks_mean_scaling[cnn-kfac]",
    "test_reference_updates.py::test_relative_damping_is_tikhonov_with_each_blocks_mean_scaling[shared-ekfac]",
    "test_reference_updates.py::test_relative_damping_is_tikhonov_with_each_blocks_mean_scaling[shared-kfac]",
    "test_mixed_precision.py::test_bfloat16_language_model_trains_with_every_method[bf16_params]",
    "test_api.py::test_update_passes_through_lax_cond[bfloat16]",
    "test_api.py::test_update_passes_through_lax_cond[float64]",
    "test_distributed.py::test_sharded_eigh_equals_replicated_and_is_spread[mlp]",
    "test_kinds.py::test_grouped_and_depthwise_conv_equal_one_conv_per_group",
    "test_kinds.py::test_norm_scale_and_shift_per_example",
    "test_kinds.py::test_conv_transpose_stats_are_per_example_grads[2d]",
    "test_kinds.py::test_conv_transpose_updates_match_dense_reference[2d]",
    "test_nnx.py::test_nnx_multi_head_attention_is_covered_and_trains",
    "test_reference_updates.py::test_ekfac_running_scalings_replay[sequence]",
    "test_reference_updates.py::test_ekfac_batch_scalings_in_stale_basis[sequence]",
    "test_transforms.py::test_vmap_over_layers_equals_explicit_layers",
    "test_transforms.py::test_scan_over_a_non_leading_axis_falls_back",
    "test_reference_updates.py::test_first_update_matches_dense_reference[cnn-ekfac-tikhonov]",
    "test_reference_updates.py::test_first_update_matches_dense_reference[cnn-ekfac-factored]",
    "test_reference_updates.py::test_first_update_matches_dense_reference[cnn-kfac-tikhonov]",
    "test_reference_updates.py::test_first_update_matches_dense_reference[cnn-kfac-factored]",
    "test_reference_updates.py::test_first_update_matches_dense_reference[sequence-ekfac-tikhonov]",
    "test_reference_updates.py::test_first_update_matches_dense_reference[sequence-ekfac-factored]",
    "test_reference_updates.py::test_first_update_matches_dense_reference[sequence-kfac-tikhonov]",
    "test_reference_updates.py::test_first_update_matches_dense_reference[sequence-kfac-factored]",
    "test_graft.py::test_the_aliases_graft_argument_is_the_chain_it_names[kfac]",  # ekfac's stays
    "test_doctests.py::test_docstring_examples[ekfac_optax.update._transform]",  # 13 s of doctests
    "test_kinds.py::test_dtype_smoke[float32]",  # bfloat16 stays
    "test_kinds.py::test_stock_transformer_runs",
    "test_kinds.py::test_conv_transpose_hand_forward_is_flax[2d]",  # 1d stays
    "test_kinds.py::test_dense_general_batch_dims_equals_separate_dense",
    "test_kinds_state.py::test_a_non_finite_step_changes_nothing_but_skipped[kfac]",
    "test_kinds_state.py::test_a_non_finite_step_changes_nothing_but_skipped[ekfac_ra]",
    "test_kinds_state.py::test_data_parallel_and_spread_basis_equal_one_device[ekfac]",
    "test_kinds_state.py::test_data_parallel_and_spread_basis_equal_one_device[kfac]",
    "test_kinds_state.py::test_resume_from_checkpoint_is_bit_identical",  # test_checkpoint's stays
    "test_nnx.py::test_nnx_twin_gives_the_linen_updates[mlp]",  # the functional-style twin stays
    "test_nnx.py::test_nnx_optimizer_trains_like_linen[mlp]",
    "test_nnx.py::test_nnx_scan_over_layers_equals_linen_scan[scan_remat]",
    "test_reliability.py::test_nonfinite_step_equals_skipping_the_batch[running-input]",
    "test_reliability.py::test_nonfinite_step_equals_skipping_the_batch[kfac-input]",
    "test_scalings.py::test_every_contraction_matches_per_example_gradients[shape1]",
    "test_scalings.py::test_every_contraction_matches_per_example_gradients[shape2]",
    "test_theorem3.py::test_ekfac_is_closer_to_the_fisher_than_kfac",
    "test_theorem3.py::test_scalings_are_the_optimal_diagonal_in_the_kfe",
    "test_theorem3.py::test_library_scalings_reproduce_brute_force",  # s*: test_reference_updates
    "test_transforms.py::test_pre_jitted_apply_with_a_warm_cache[jit]",
    "test_checkpoint.py::test_checkpoint_of_another_model_names_the_layers",
    "test_transforms.py::test_scan_over_layers_equals_unrolled[bias_norm]",  # scan_of_remat stays
    "test_transforms.py::test_transform_in_the_loss_changes_nothing[nn.jit]",
    "test_transforms.py::test_transform_in_the_loss_changes_nothing[jax.checkpoint(closure)]",
    "test_transforms.py::test_transform_in_the_loss_changes_nothing[jax.checkpoint(apply)]",
    "test_transforms.py::test_pre_jitted_apply_with_a_warm_cache[eager]",
    "test_transforms.py::test_integer_inputs_to_a_dense_layer",
    # max_factor_dim: one case of each stays (mlp and sequence references, the input side of a
    # scanned block, the api's per-example diagonal and summarize)
    "test_reference_updates.py::test_capped_factors_match_dense_reference[cnn]",
    "test_reference_updates.py::test_capped_factors_match_dense_reference[shared]",
    "test_transforms.py::test_scan_with_capped_factors_equals_unrolled[both_sides]",
    "test_kinds.py::test_dtype_smoke[float32_capped]",
    "test_distributed.py::test_sharded_eigh_equals_replicated_and_is_spread[mlp_capped]",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.nodeid.split("/")[-1] in SLOW_CASES:
            item.add_marker(pytest.mark.slow)
