"""Plant one-line bugs in the core and see which ones the tests notice.

    python tests/mutants.py                 # every mutant, on a copy of the working tree as it is now
    python tests/mutants.py kl_reversed ... # only these
    python tests/mutants.py --list          # names, targets and the tests each one runs
    python tests/mutants.py --from-head     # copy the last commit instead of the working tree

Each mutant replaces one exact piece of source text (a line or part of one) in
the core modules (``train/``, ``coders/``, ``datasets/``, ``base_models/``,
``util/``, ``serve/``). The replacement is made in a temporary copy of the repository,
never in the working tree, and only the few tests meant to catch that bug run
against it. A mutant is *killed* when one of them turns red, *survived* when
all stay green, and *not applied* when its text is no longer found exactly
once (the core moved on: update the mutant). Tests already red before any
mutant is planted are reported and ignored.

Not part of CI (``pytest`` does not collect this file): run it after changing
the core or the tests. The exit status is 1 when a mutant survived.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ("train", "coders", "datasets", "base_models", "util", "serve")

CATCH = "tests/test_catchers.py::"
STRENGTH = "tests/test_serve_strength.py::"
HARDENING = "tests/test_hardening.py::"
ENGINE = "tests/test_engine.py::"
PARITY = "tests/test_parity_coders.py::"
TRAINING = "tests/test_parity_training.py::"
SCALE = "tests/test_nworker_scale.py::"
PLANTED = "tests/test_planted.py::"


@dataclass
class Mutant:
    name: str
    old: str            # exact text, found once in the core (or in ``path``)
    new: str
    tests: list[str]    # pytest node ids, the fastest that should catch it
    path: str = ""      # the file, when the text alone is not unique across the core
    why: str = ""
    applied_to: str = field(default="", init=False)


MUTANTS = [
    # -- the survivors of the first mutation run (issue 13) --
    Mutant("kl_reversed",
           "F.kl_div(F.log_softmax(recon / t, dim=-1), F.log_softmax(target / t, dim=-1),",
           "F.kl_div(F.log_softmax(target / t, dim=-1), F.log_softmax(recon / t, dim=-1),",
           [CATCH + "test_kl_base_is_kl_of_f_outputs_against_the_reconstruction",
            CATCH + "test_kl_loss_in_a_run_is_kl_base", ENGINE + "test_every_loss_trains"],
           why="KL-Base computed as KL(reconstruction || F)"),
    Mutant("augment_clean_targets",
           "fx = self.base(x.flatten(0, 1)).view(*idx.shape, -1)", "fx = fx_all[idx]",
           [CATCH + "test_under_augmentation_the_targets_are_f_on_the_augmented_images",
            "tests/test_augment_channels.py::test_conv_encoder_on_colour_images_with_augmentation_trains"],
           why="the encoder trained against F's outputs on the un-augmented images"),
    Mutant("best_val_not_restored",
           'self.epoch, self.best_val = state["epoch"], state["best_val"]', 'self.epoch = state["epoch"]',
           [CATCH + "test_resume_remembers_the_best_validation_accuracy",
            ENGINE + "test_resume_reproduces_an_uninterrupted_run"],
           why="resume forgets the best validation accuracy; the next epoch overwrites best.pt"),
    Mutant("torch_rng_not_restored",
           'torch.set_rng_state(state["rng"]["torch"])', "pass",
           [CATCH + "test_resume_restores_the_global_torch_generator",
            ENGINE + "test_resume_reproduces_an_uninterrupted_run"],
           why="resume leaves torch's global generator where initialisation left it"),
    Mutant("berrut_parity_nodes_at_end",
           "parity_index = [(j + 1) * (n - 1) // (ec_r + 1) for j in range(ec_r)]",
           "parity_index = [ec_k + j for j in range(ec_r)]",
           [CATCH + "test_berrut_parity_nodes_sit_among_the_data_nodes",
            CATCH + "test_berrut_two_data_one_parity_is_the_mean",
            CATCH + "test_berrut_code_matches_the_closed_form_interpolant",
            TRAINING + "test_berrut_needs_no_training"],
           why="Berrut's parity nodes at the end of [-1, 1] instead of among the data nodes"),
    Mutant("best_tie_to_later_epoch",
           "improved = val is not None and val > self.best_val",
           "improved = val is not None and val >= self.best_val",
           [CATCH + "test_a_tie_for_the_best_validation_accuracy_goes_to_the_earlier_epoch",
            ENGINE + "test_best_checkpoint_and_only_test"],
           why="a tie for the best validation accuracy won by the later epoch"),
    # -- bugs that had a single catcher --
    Mutant("loss_over_available_outputs",
           "return ~available[:, :ec_k]", "return torch.ones_like(available[:, :ec_k])",
           [CATCH + "test_unavailable_outputs_reach_neither_the_decoder_nor_the_loss",
            ENGINE + "test_loss_only_counts_unavailable_reconstructions", "tests/test_scenarios.py"],
           why="losses and accuracies over every data output, available ones included"),
    Mutant("mask_first_of_r_only",
           "row[list(missing)] = False", "row[list(missing)[:1]] = False",
           [CATCH + "test_unavailable_outputs_reach_neither_the_decoder_nor_the_loss",
            ENGINE + "test_decoder_sees_exactly_the_masked_outputs", "tests/test_scenarios.py"],
           why="with r > 1, only the first unavailable output of a scenario is masked"),
    Mutant("metrics_targets_swapped",
           "targets = torch.stack([base_out.detach().argmax(1), labels], 1)",
           "targets = torch.stack([labels, base_out.detach().argmax(1)], 1)",
           [CATCH + "test_accuracies_of_a_run_count_f_and_label_targets_in_the_top_1_and_top_5",
            "tests/test_metrics.py"],
           why="reconstruction accuracy counted against the labels, degraded-mode against F"),
    Mutant("top5_is_top1",
           "return torch.stack([hit[:, 0].sum(0), hit.any(1).sum(0)], 1)",
           "return torch.stack([hit[:, 0].sum(0), hit[:, 0].sum(0)], 1)",
           [CATCH + "test_accuracies_of_a_run_count_f_and_label_targets_in_the_top_1_and_top_5",
            "tests/test_metrics.py"],
           why="top-5 accuracy counts top-1 hits only"),
    Mutant("concat_tiles_reversed",
           "grid = tiles.view(b, self.rows, self.cols,", "grid = tiles.flip(1).view(b, self.rows, self.cols,",
           [CATCH + "test_concatenation_tiles_by_hand", PARITY + "test_concatenation_places_each_image_in_its_tile"],
           why="the concatenation code puts input i in another input's tile"),
    Mutant("images_epoch_one_pass",
           'passes = self.k if self.cfg.epoch_groups == "images" else 1', "passes = 1",
           [CATCH + "test_an_epoch_draws_each_training_image_k_times_or_once",
            ENGINE + "test_resume_takes_the_optimizer_settings_from_the_config"],
           why='the "images" epoch draws each image once, like "disjoint"'),
    # -- more of the first run's bugs, kept so that they stay caught --
    Mutant("kl_summed_over_rows",
           'reduction="batchmean", log_target=True)', 'reduction="sum", log_target=True)',
           [CATCH + "test_kl_base_is_kl_of_f_outputs_against_the_reconstruction",
            CATCH + "test_kl_loss_in_a_run_is_kl_base"],
           why="KL-Base summed over the batch instead of averaged over rows"),
    Mutant("parity_only_scenario_kept",
           "if missing == parity_only:", "if False:",
           ["tests/test_scenarios.py", CATCH + "test_unavailable_outputs_reach_neither_the_decoder_nor_the_loss"],
           why="the scenario with only parities missing is trained and scored too"),
    Mutant("f_not_frozen",
           "model.requires_grad_(False)", "model.requires_grad_(True)", path="coders/systematic.py",
           tests=[ENGINE + "test_step_reaches_every_coder_parameter_and_never_touches_f",
                  ENGINE + "test_f_stays_frozen_over_a_whole_fit"],
           why="F's weights take gradients"),
    Mutant("parity_outputs_dropped",
           "return self.decode_scenarios(torch.cat([fx, fp], 1)), fp",
           "return self.decode_scenarios(torch.cat([fx, torch.zeros_like(fp)], 1)), fp",
           [CATCH + "test_unavailable_outputs_reach_neither_the_decoder_nor_the_loss",
            ENGINE + "test_decoder_sees_exactly_the_masked_outputs", TRAINING + "test_berrut_needs_no_training"],
           why="the decoder never sees the parity outputs"),
    Mutant("berrut_weights_not_alternating",
           "sign = 1 - 2 * ((used.cumsum(dim=-1) - 1) % 2)", "sign = torch.ones_like(used)",
           [CATCH + "test_berrut_code_matches_the_closed_form_interpolant",
            PARITY + "test_berrut_weights_alternate_over_used_nodes_by_location"],
           why="Berrut's weights all +1 (a plain inverse-distance average)"),
    Mutant("subtraction_adds",
           "missing = in_data[:, self.ec_k:] - data.sum(dim=1, keepdim=True)",
           "missing = in_data[:, self.ec_k:] + data.sum(dim=1, keepdim=True)",
           [PARITY + "test_subtraction_decoder_solves_by_hand", PARITY + "test_linear_model_is_reconstructed_exactly"],
           why="the subtraction decoder adds the available outputs"),
    Mutant("mds_nodes_repeated",
           "nodes = 1.0 - 0.5 * torch.cos((2 * i + 1) * math.pi / (2 * ec_k))",
           "nodes = 1.0 - 0.5 * torch.cos((2 * (i // 2) + 1) * math.pi / (2 * ec_k))",
           [PARITY + "test_mds_every_choice_of_k_outputs_is_invertible",
            PARITY + "test_linear_model_is_reconstructed_exactly"],
           why="two MDS coefficient columns coincide: some choices of k outputs cannot be inverted"),
    Mutant("adam_moments_not_loaded",
           'self.optimizer.load_state_dict(state["optimizer"])', "pass",
           [CATCH + "test_resume_carries_the_optimizer_moments_over_exactly",
            ENGINE + "test_resume_takes_the_optimizer_settings_from_the_config"],
           why="resume starts Adam's moments from zero"),
    Mutant("shuffle_rng_not_restored",
           'self.gen.set_state(state["rng"]["shuffle"])', "pass",
           [ENGINE + "test_resume_reproduces_an_uninterrupted_run"],
           why="resume reshuffles the data with the generator as initialisation left it"),
    # -- scaling out (issue 14) --
    Mutant("dist_equal_weights",
           "return Share(part, (part.stop - part.start) / n)", "return Share(part, 1 / self.world)",
           ["tests/test_distributed.py::test_two_processes_equal_one_and_resume"],
           why="torchrun averages the ranks' gradients with equal weights, wrong for a step that splits unevenly"),
    Mutant("dist_metrics_not_summed",
           "            self.dist.sum_tally(tally)\n        return tally.result(split,",
           "            pass\n        return tally.result(split,",
           ["tests/test_distributed.py::test_two_processes_equal_one_and_resume"],
           why="torchrun logs rank 0's share of the evaluation as the whole split's metrics"),
    Mutant("ray_retry_starts_afresh",
           "resume, overwrite = True, False", "pass",
           ["tests/test_ray_sweep.py::test_killed_worker_is_retried_and_resumes"],
           why="a Ray task retried after its worker died does not resume from current.pt"),
    # -- learned codes that lose less (issue 15) --
    Mutant("schedule_restarts_on_resume",
           "factor = self.schedule(progress(self.epoch, n_step, steps, self.cfg.num_epoch))",
           "factor = self.schedule(progress(0, n_step, steps, self.cfg.num_epoch))",
           ["tests/test_schedule.py::test_a_scheduled_run_resumed_after_a_kill_gives_the_same_numbers",
            "tests/test_schedule.py::test_cosine_sets_every_steps_rate_from_its_place_in_the_run"],
           why="every epoch's steps get the first epoch's rates, and a resumed run starts its schedule again"),
    Mutant("schedule_per_epoch_only",
           "    return (epoch + step_index / max(steps_per_epoch, 1)) / num_epoch",
           "    return epoch / num_epoch",
           ["tests/test_schedule.py::test_cosine_sets_every_steps_rate_from_its_place_in_the_run"],
           why="the rate changes once an epoch instead of before every step"),
    Mutant("spec_name_drops_args",
           '    args = spec.get("args") or {}\n    if not args:',
           '    args = {}\n    if not args:',
           ["tests/test_config.py::test_specs_differing_only_in_args_get_their_own_run_folders",
            "tests/test_mlp_coders.py::test_a_wide_decoder_trains_in_its_own_folder"],
           why="two specs of one class with different args share a run folder"),
    Mutant("decoder_width_ignored",
           "h1, h2 = (m, ec_k * n) if hidden is None else (check_size(hidden, m),) * 2",
           "h1, h2 = (m, ec_k * n)",
           ["tests/test_mlp_coders.py::test_hidden_sets_the_widths_of_the_hidden_layers_only"],
           why="the decoder's 'hidden' arg is accepted and ignored"),
    Mutant("f_writer_no_lock",
           '            lock.acquire("base model folder")\n            break',
           '            break',
           ["tests/test_base_models.py::test_a_second_writer_of_f_waits_then_loads_what_the_first_wrote",
            "tests/test_base_models.py::test_base_models_fit_refuses_a_folder_another_process_writes"],
           why="two processes train F into one folder at once"),
    Mutant("plain_run_joins_seed_sweep",
           '"group": (f"seeds of {folder.parent}" if config.get("run_seed") is not None else f"run {folder}"),',
           '"group": str(folder.parent if config.get("run_seed") is not None else folder),',
           ["tests/test_report.py::test_a_plain_run_in_the_folder_above_its_seed_sweep_is_not_one_of_the_seeds"],
           why="util.report counts a plain run as one more seed of the sweep in the folders below it"),
    Mutant("report_merges_nworker_seeds_on_systematic_columns",
           'for key, _, kind in columns_of(row.get("form", "systematic"), row.get("classify", True)):',
           'for key, _, kind in (COLUMNS if row.get("classify", True) else REGRESSION_COLUMNS):',
           ["tests/test_report.py::test_one_report_prints_both_forms_tables_and_one_form_on_request"],
           why="util.report averages an N-worker sweep's seeds over the systematic columns only (its errors "
               "are one seed's)"),
    Mutant("nworker_by_n_reads_half_lines",
           "yield saved, report.read_rows(folder / report.METRICS_FILE)",
           "yield saved, [json.loads(x) for x in (folder / report.METRICS_FILE).read_text().splitlines()]",
           ["tests/test_report.py::test_train_nworker_by_n_averages_seeds_and_shows_the_lam_of_lowest_validation_mse"],
           why="python -m train.nworker --by-n stops at a metrics line a kill cut short"),
    # -- serving and the simulator (issue 25) --
    Mutant("summary_keeps_warmup",
           "keep = slice(warmup, None)", "keep = slice(0, None)",
           [STRENGTH + "test_the_summary_is_the_percentiles_and_accuracies_of_the_queries_after_warmup"],
           why="summary.json counts the warmup queries"),
    Mutant("summary_recon_accuracy_over_all",
           'out["accuracy_reconstructed"] = float(correct[recon].mean()) if recon.any() and scored else float("nan")',
           'out["accuracy_reconstructed"] = float(correct.mean()) if recon.any() and scored else float("nan")',
           [STRENGTH + "test_the_summary_is_the_percentiles_and_accuracies_of_the_queries_after_warmup"],
           why="top-1 on reconstructed queries counts every query"),
    Mutant("summary_p999_is_p99",
           'out[f"p{p:g}_ms"] = float(np.percentile(latency_ms, p))',
           'out[f"p{p:g}_ms"] = float(np.percentile(latency_ms, min(p, 99)))',
           [STRENGTH + "test_the_summary_is_the_percentiles_and_accuracies_of_the_queries_after_warmup"],
           why="p99.9 reported as p99"),
    Mutant("parity_instances_interleaved",
           "return np.where(query >= 0, query % m, m + (slot - k) * per + group % per)",
           "return np.where(query >= 0, query % m, m + (group % per) * r + (slot - k))",
           [STRENGTH + "test_with_r_of_2_or_more_and_more_instances_than_k_parity_j_reaches_parity_model_j"],
           why="with r >= 2 and m > k, parity j reaches another parity model's instance"),
    Mutant("decode_mask_aliased",
           "grp.have = mask.copy()", "grp.have = mask",
           ["tests/test_app.py::test_every_rebuilt_answer_is_the_decoders_output_on_what_was_in_hand"],
           why="a group's decision mask is its live have-mask: an output landing later in the round joins the decode"),
    Mutant("reroute_to_any_role",
           "same = np.nonzero(roles == ro)[0]", "same = np.arange(len(roles))",
           [STRENGTH + "test_after_a_fail_stop_requests_go_to_a_live_instance_of_the_same_role",
            "tests/test_serve.py::test_requests_after_a_failure_go_to_a_live_instance_of_the_same_role"],
           why="after a fail-stop, a request goes to the next live instance of any role"),
    Mutant("slow_fraction_inverted",
           'return streams(seed)["slowdown"].random((n_periods, max(num_instances, 1))) < slowdown["fraction"]',
           'return streams(seed)["slowdown"].random((n_periods, max(num_instances, 1))) > slowdown["fraction"]',
           [STRENGTH + "test_a_fraction_of_periods_is_slow_and_the_factor_stretches_compute_and_delay"],
           why="1 - fraction of the periods are slow"),
    Mutant("slow_factor_on_delay_only",
           "self.service = (self.compute + plan.delay) * plan.factor",
           "self.service = self.compute + plan.delay * plan.factor",
           [STRENGTH + "test_a_fraction_of_periods_is_slow_and_the_factor_stretches_compute_and_delay"],
           why="the simulator slows the injected delay but not the compute"),
    Mutant("replicate_retry_at_first_loss",
           "later = copies[need].argmax(axis=1)", "later = copies[need].argmin(axis=1)",
           [STRENGTH + "test_a_query_is_sent_again_only_when_both_copies_are_lost_and_at_the_later_loss"],
           why="the simulator sends a replicated query again when its first copy is lost, not its last"),
    Mutant("ray_resends_while_copy_coming",
           "            if any(self.state[row] == OUTSTANDING for row in others):\n                return\n",
           "",
           [STRENGTH + "test_on_ray_a_lost_copy_is_not_sent_again_while_the_other_is_still_coming"],
           why="on Ray, a lost copy is sent again while the other copy is still coming"),
    Mutant("ray_parity_actors_of_model_0",
           "out.append(self.f[n] if role == ROLE_F else self.backup[n] if role == ROLE_BACKUP else self.parity[role][n])",
           "out.append(self.f[n] if role == ROLE_F else self.backup[n] if role == ROLE_BACKUP else self.parity[0][n])",
           [STRENGTH + "test_with_r_of_2_or_more_and_more_instances_than_k_parity_j_reaches_parity_model_j"],
           why="on Ray, every parity goes through parity model 0"),
    Mutant("digest_train_split_only",
           'for s in ("train", "val", "test") for xy in ("x", "y"))',
           'for s in ("train",) for xy in ("x", "y"))',
           [STRENGTH + "test_resume_refuses_other_images_or_labels_in_any_one_split"],
           why="resume accepts changed validation or test images when the training images are the same"),
    Mutant("checkpoint_contents_unchecked",
           "    check_contents(state, path)\n", "",
           [HARDENING + "test_resume_on_a_checkpoint_without_module_weights_is_exit_2_naming_the_file"],
           why="a checkpoint without the module weights ends in KeyError: 'encoder'"),
    Mutant("encode_channels_mixed_with_parities",
           "return parities.reshape(b, c, self.r, -1).transpose(1, 2).reshape(b, self.r, c, *spatial)",
           "return parities.reshape(b, self.r, c, *spatial)",
           [STRENGTH + "test_colour_images_are_encoded_channel_by_channel_with_r_of_two_or_more"],
           why="with C > 1 and r >= 2, parity j's channel c holds another parity's or channel's values"),
    Mutant("dataset_cache_by_name",
           "key = (name, os.path.abspath(root))", "key = (name,)",
           [STRENGTH + "test_the_dataset_cache_reads_each_folder_once_and_each_its_own"],
           why="a second data_dir in one process gets the first folder's images"),
    Mutant("ray_sweep_completion_order",
           "return [results[i] for i in sorted(results)]", "return list(results.values())",
           [STRENGTH + "test_a_ray_sweep_returns_results_in_the_sweeps_run_order"],
           why="--ray returns the runs' results in the order they finished"),
    # -- N-worker codes under the literature's conditions (issue 31) --
    Mutant("latency_points_drop_minus_one",
           "points = torch.cos(i * math.pi / (m - 1))", "points = torch.cos(i * math.pi / m)",
           [SCALE + "test_latency_worker_points_hold_both_ends", SCALE + "test_each_placement_is_its_closed_form"],
           why="ApproxIFER's latency placement (second kind) loses the node -1"),
    Mutant("approxifer_points_second_kind",
           "points = torch.cos(i * math.pi / m)", "points = torch.cos(i * math.pi / max(m - 1, 1))",
           [SCALE + "test_approxifer_worker_points_hold_one_but_not_minus_one",
            SCALE + "test_each_placement_is_its_closed_form"],
           why="ApproxIFER's accuracy placement is read as its latency one"),
    Mutant("spline_refuses_its_minimum",
           "if bool((counts < MIN_POINTS).any()):", "if bool((counts <= MIN_POINTS).any()):",
           [SCALE + "test_spline_decoder_accepts_exactly_its_minimum_number_of_answers"],
           why="the spline decoder refuses N - S = 5 answers, the least SciPy's spline takes"),
    Mutant("training_patterns_with_the_evaluation_seed",
           "cfg.max_patterns, spec.train_seed(cfg)),",
           "cfg.max_patterns, cfg.seed + 1),",
           [SCALE + "test_training_patterns_are_not_the_evaluation_patterns"],
           why="an N-worker code trains on exactly the straggler patterns it is scored on"),
    Mutant("pattern_cache_evicts_the_newest",
           "self._entries.popitem(last=False)", "self._entries.popitem(last=True)",
           [SCALE + "test_bounded_pattern_cache_evicts_the_least_recently_used",
            SCALE + "test_the_byte_bounded_cache_evicts_the_least_recently_used_entry"],
           why="the bounded cache (util/lru.py) throws away the entry just used instead of the least recent"),
    Mutant("pattern_cache_unbounded",
           "while self.used + size > self.max_bytes:", "while False:",
           [SCALE + "test_bounded_pattern_cache_evicts_the_least_recently_used",
            SCALE + "test_the_byte_bounded_cache_evicts_the_least_recently_used_entry"],
           why="the decoders' pattern caches (util/lru.py) grow without bound"),
    Mutant("berrut_decoder_ignores_a_worker_on_a_data_point",
           "take = self.has_hit & available[:, self.hit_worker]", "take = self.has_hit & False",
           [SCALE + "test_factored_berrut_decoder_is_the_interpolant_through_the_answering_workers"],
           why="where a data point is a worker's point, the factored decoder drops that worker's output"),
    # -- the bugs the whole suite let through in hardening round 4 (issue 32) --
    Mutant("p2c_to_the_busier",
           "return a if self.outstanding[a] <= self.outstanding[b] else b",
           "return a if self.outstanding[a] >= self.outstanding[b] else b",
           [PLANTED + "test_power_of_two_choices_sends_to_the_less_busy_of_its_two_draws"],
           why="power-of-two-choices routing sends to the busier of its two draws"),
    Mutant("hedge_after_answer_without_cancel",
           "if self.answers_of[q] and (self.cancel_on or self.defer is not None):",
           "if self.answers_of[q] and self.cancel_on:",
           [PLANTED + "test_a_hedged_copy_is_not_sent_once_its_query_is_answered_even_without_cancellation"],
           why="with deferral but no cancellation, a hedged copy goes out after its query is answered"),
    Mutant("deferral_percentile_over_empty_window",
           "np.percentile(self.window[:min(self.samples, w)], ", "np.percentile(self.window, ",
           [PLANTED + "test_a_percentile_deferral_is_taken_over_the_latencies_seen_not_the_empty_window"],
           why="the deferral percentile taken over the whole window, its unfilled zeros included"),
    Mutant("ray_slow_factor_on_delay_only",
           "remaining = (compute + delay_s) * factor - (time.perf_counter() - start)",
           "remaining = compute + delay_s * factor - (time.perf_counter() - start)",
           [PLANTED + "test_a_slow_period_on_ray_stretches_the_compute_as_well_as_the_delay"],
           why="on Ray, a slow period stretches the injected delay but not the compute"),
    Mutant("rejected_counts_requests",
           'self.counts["rejected"] += n', 'self.counts["rejected"] += 1',
           [PLANTED + "test_metrics_count_refused_queries_not_requests"],
           why="/metrics' rejected count counts refused requests, not queries"),
    Mutant("loadgen_p99_is_0_99th_percentile",
           '"server_p99_ms": float(np.nanpercentile(rec["server_ms"][ok], 99)),',
           '"server_p99_ms": float(np.nanpercentile(rec["server_ms"][ok], 0.99)),',
           [PLANTED + "test_the_load_generators_server_and_http_percentiles_are_the_50th_and_99th"],
           why="the load generator's server p99 computed as the 0.99th percentile"),
    Mutant("uniform_box_drops_low",
           'width = _broadcast(spec.high, shape, "high", ConfigError) - low',
           'width = _broadcast(spec.high, shape, "high", ConfigError)',
           [PLANTED + "test_a_uniform_domain_fills_its_whole_box"],
           why="the uniform domain's box width drops 'low': [-3, 3] drawn as [-3, 0]"),
    Mutant("normal_sampler_uniform",
           "draw = lambda m, g: mean + std * torch.randn(m, *shape, generator=g)",
           "draw = lambda m, g: mean + std * torch.rand(m, *shape, generator=g)",
           [PLANTED + "test_a_normal_domain_draws_normal_numbers"],
           why="the normal sampler draws uniform numbers"),
    Mutant("file_domain_unshuffled",
           "pool = data[torch.randperm(n, generator=gen)]", "pool = data",
           [PLANTED + "test_a_file_domain_is_shuffled_with_the_seed_before_it_is_cut"],
           why="a file domain cut in file order, without the seeded shuffle"),
]


def snapshot(dest: Path, from_head: bool) -> None:
    """Copy the repository into ``dest``: the working tree's files as they are now, or the last commit."""
    if from_head:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # a file deleted in the tree but still in the index is skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def locate(tree: Path, mutant: Mutant) -> tuple[Path | None, str]:
    """The one file of ``tree`` holding ``mutant.old`` exactly once, or ``(None, reason)``."""
    files = [tree / mutant.path] if mutant.path else sorted(p for d in CORE for p in (tree / d).rglob("*.py"))
    hits = [(p, p.read_text().count(mutant.old)) for p in files if p.is_file()]
    hits = [(p, n) for p, n in hits if n]
    if not hits:
        return None, "text not found"
    if len(hits) > 1 or hits[0][1] > 1:
        where = ", ".join(f"{p.relative_to(tree)} x{n}" for p, n in hits)
        return None, f"text not unique ({where}); give the mutant a path"
    return hits[0][0], ""


def run_tests(tree: Path, tests: list[str], timeout: float) -> tuple[str, set[str], str]:
    """Run ``tests`` in ``tree``: ``(outcome, red test ids, output tail)``, outcome one of
    "green", "red", "timeout", "error" (pytest could not run them)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "--no-header", *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", set(), ""
    out = proc.stdout + proc.stderr
    red = {m.group(1).split("[")[0] for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", out, re.M)}
    if proc.returncode == 0:
        return "green", red, out
    if proc.returncode == 1 or red:
        return "red", red, out
    return "error", red, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tests/mutants.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to plant (default: all)")
    ap.add_argument("--list", action="store_true", help="print the mutants and their tests, run nothing")
    ap.add_argument("--from-head", action="store_true", help="mutate the last commit, not the working tree")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mutant's test run (default 900)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy and print where it is")
    args = ap.parse_args(argv)

    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        ap.error(f"unknown mutant(s) {', '.join(unknown)}; --list shows them")
    chosen = [by_name[n] for n in args.names] or MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.why}\n    {m.path or 'core'}: {m.old!r}\n    -> {m.new!r}")
            print("".join(f"    test {t}\n" for t in m.tests))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="lcc-mutants-"))
    tree = tmp / "repo"
    tree.mkdir()
    try:
        snapshot(tree, args.from_head)
        print(f"copy of {'HEAD' if args.from_head else 'the working tree'} in {tree}", flush=True)
        where = subprocess.run([sys.executable, "-c", "import train.losses; print(train.losses.__file__)"],
                               cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                               capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(tree)):
            print(f"error: the copy imports the core from {where or '(nowhere)'}, not from {tree}", file=sys.stderr)
            return 2

        every_test = sorted({t for m in chosen for t in m.tests})
        t0 = time.time()
        outcome, red_before, out = run_tests(tree, every_test, args.timeout * 2)
        print(f"unmutated: {len(every_test)} test ids {outcome} ({time.time() - t0:.0f}s)", flush=True)
        if outcome in ("error", "timeout"):
            print(out[-3000:], file=sys.stderr)
            return 2
        if red_before:
            print("  red before any mutant, ignored below: " + ", ".join(sorted(red_before)), flush=True)

        results = []
        for m in chosen:
            target, reason = locate(tree, m)
            if target is None:
                results.append((m, "not applied", reason))
                print(f"{m.name:<32} not applied: {reason}", flush=True)
                continue
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new))
            t0 = time.time()
            try:
                outcome, red, out = run_tests(tree, m.tests, args.timeout)
            finally:
                target.write_text(original)
            red -= red_before
            if outcome == "timeout":
                verdict, detail = "killed", "timeout"
            elif outcome == "error":
                verdict, detail = "error", out.strip().splitlines()[-1] if out.strip() else "pytest failed"
            elif red:
                verdict, detail = "killed", ", ".join(sorted(t.split("::")[-1] for t in red))
            else:
                verdict, detail = "SURVIVED", f"{len(m.tests)} test ids green"
            results.append((m, verdict, detail))
            print(f"{m.name:<32} {verdict:<8} {time.time() - t0:5.0f}s  [{target.relative_to(tree)}] {detail}",
                  flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    count = lambda v: sum(verdict == v for _, verdict, _ in results)  # noqa: E731
    print(f"\n{len(results)} mutants: {count('killed')} killed, {count('SURVIVED')} survived, "
          f"{count('not applied')} not applied, {count('error')} errors")
    survivors = [m.name for m, verdict, _ in results if verdict == "SURVIVED"]
    if survivors:
        print("survived: " + ", ".join(survivors))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
