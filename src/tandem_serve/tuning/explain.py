"""Readable tables of a plan: the chosen stages, the alternatives, and why each stage sits where it does."""

from __future__ import annotations

from tandem_serve.tuning.plan import TOKEN_BUDGET_STAGES, TOKEN_RATE_SHARE, PipelinePlan, PlanReport, feasible


def _stage_table(plan: PipelinePlan) -> list[str]:
    lines = [f"  {'stage':<17}{'model':<17}{'device':<15}{'prec':<6}{'batch':>6}{'inst':>5}{'delay us':>9}"
             f"{'ms/item':>9}{'xfer ms/item':>13}{'step ms/item':>13}{'step CPU ms':>12}"]
    for s in plan.stages:
        device = s.device + (f"+{s.cpu_instances}cpu" if s.cpu_share else "")
        lines.append(f"  {s.stage:<17}{s.model:<17}{device:<15}{s.precision:<6}{s.batch:>6}{s.instances:>5}"
                     f"{s.queue_delay_us:>9}{s.cost_per_item_ms:>9.3f}{s.transfer_per_item_ms:>13.4f}"
                     f"{s.serving_per_item_ms:>13.4f}{s.serving_cpu_per_item_ms:>12.4f}")
    return lines


def _token_budget_lines(plan: PipelinePlan) -> list[str]:
    """The encoder's token budget and where it comes from."""
    lines = []
    for s in plan.stages:
        if s.stage not in TOKEN_BUDGET_STAGES:
            continue
        if s.max_batch_tokens:
            lines.append(f"  {s.stage}: at most {s.max_batch_tokens} tokens per call (rows x length), where its profiled "
                         f"token rate reaches {TOKEN_RATE_SHARE:.0%} of its best: a batch's rows run in groups of similar "
                         "length")
        else:
            lines.append(f"  {s.stage}: no token budget (its profiled token rate still climbs at the largest batch; "
                         "profile larger --batch-sizes to find where it levels off)")
    return lines


def _host_work_lines(plan: PipelinePlan) -> list[str]:
    """GPU stages whose instances also work on the host (encoder_utf8 tokenizing its batch)."""
    return [f"  {s.stage}: its instances also tokenize, {s.host_cpu_per_item_ms:.3f} ms of CPU per item (the profiled "
            "tokenize, on the instance's own thread and core), counted in their busy time"
            for s in plan.stages if s.host_cpu_per_item_ms]


def _why(plan: PipelinePlan, alternatives: list[PipelinePlan]) -> list[str]:
    """For each stage: the best plan that puts it elsewhere (other device, or another ensemble) and the cost."""
    lines = []
    for index, stage in enumerate(plan.stages):
        others = [a for a in alternatives
                  if a.ensemble != plan.ensemble or a.stages[index].device != stage.device]
        if not others or stage.device == "cpu" and stage.stage in ("tokenize", "image_preprocess", "nms"):
            continue
        best = others[0]
        where = best.ensemble if best.ensemble != plan.ensemble else best.stages[index].device
        reason = (f"{stage.stage} on {stage.device}: the best plan with it on {where} reaches "
                  f"{best.throughput:.0f}/s ({best.throughput / plan.throughput:.2f}x), bound by the {best.bottleneck}")
        if best.ensemble != plan.ensemble:
            reason += f" [{best.placement()}]"
        lines.append("  - " + reason)
    return lines


def _serving_line(report: PlanReport) -> str:
    """What the profile measured of Triton's own costs, as the plan charges them."""
    serving = report.serving
    if serving is None:
        return "Triton step cost: not in the profile (stage compute only; profile with the serving cost for it)"
    line = (f"Triton step cost (measured): latency {serving.step_s * 1e3:.3f} ms per request + "
            f"{serving.byte_s * (1 << 20) * 1e3:.3f} ms per MiB it receives")
    if not serving.cpu_measured:
        return line + " (also charged as CPU time: the profile has no CPU times)"
    line += (f"; CPU {serving.step_cpu_s * 1e3:.3f} ms per step ({serving.step_cpu_shared_s * 1e3:.3f} ms of it "
             f"per execution, shared by a batch) + {serving.byte_cpu_s * (1 << 20) * 1e3:.3f} ms per MiB, and "
             f"{serving.request_cpu_s * 1e3:.3f} ms per request (gRPC, the ensemble)")
    for stage, adapter in serving.adapters.items():
        apart = f" ({adapter.period_s * 1e3:.3f} ms apart, hand-off included)" if adapter.period_s else ""
        line += (f"\n{stage} served alone: an instance busy {adapter.busy_s * 1e3:.3f} ms{apart} and its stub "
                 f"{adapter.stub_cpu_s * 1e3:.3f} ms of CPU per request (measured)")
    return line


def format_report(report: PlanReport, top: int = 5) -> str:
    """The report as text: per pipeline the chosen plan, the runners-up, and the reasons."""
    out = [f"objective: {report.objective.describe()} (precisions within {report.objective.min_accuracy:g} of fp32)"]
    out.append(_serving_line(report))
    for pipeline, plan in report.chosen.items():
        alternatives = report.alternatives[pipeline]
        ok = "" if feasible(plan, report.objective) else "  (NO plan meets the latency bound: the fastest shown)"
        on = f" on {plan.gpus} GPUs" if plan.gpus > 1 else ""
        out += ["", f"{pipeline}: ensemble '{plan.ensemble}' at size {plan.size}{on}: {plan.throughput:.0f} items/s, "
                    f"~{plan.latency_ms:.1f} ms, {plan.bottleneck}-bound (CPU bound {plan.cpu_bound:.0f}/s, "
                    f"GPU bound {plan.gpu_bound:.0f}/s, GPU instances {plan.instance_bound:.0f}/s){ok}"]
        out += _stage_table(plan)
        out += _host_work_lines(plan)
        out += _token_budget_lines(plan)
        if pipeline in report.torchserve:
            out.append("  " + report.torchserve[pipeline].explain())
        out.append("  why:")
        out += _why(plan, alternatives[1:]) or ["  - no alternative placement was profiled"]
        out.append(f"  runners-up ({len(alternatives) - 1} scored):")
        for alt in alternatives[1 : top + 1]:
            out.append(f"    {alt.throughput:>9.0f}/s {alt.latency_ms:>7.1f} ms  {alt.placement()}  "
                       f"batches {','.join(str(s.batch) for s in alt.stages)}")
    if report.rejected:
        out += ["", "left out:"] + [f"  - {r}" for r in report.rejected]
    return "\n".join(out)
