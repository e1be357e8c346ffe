//! Best-of-N editing, ICEdit's early filter: several seeds denoise a few steps, a judge compares
//! their previews, and only the best is finished.
//!
//! Two ways to get the previews:
//! - [`EarlyFilter::Continue`] (default): each candidate runs the first `early_steps` of the full
//!   schedule; its preview is the clean-image estimate there; the winner goes on from its saved
//!   state. Cost: `steps + (N - 1) * early_steps` transformer evaluations.
//! - [`EarlyFilter::Restart`] (the paper): each candidate runs a separate short schedule of
//!   `early_steps`; the winner is then run again from scratch. Cost: `N * early_steps + steps`.
//!
//! Two ways to choose: the paper's running-best tournament (N - 1 judge calls), or successive
//! halving (pairs compared, the better half kept, at twice the steps each round; also N - 1
//! calls, with later rounds judged on clearer previews).

use std::time::Duration;

use icedit_judge::{Comparison, Judge, Preference};
use image::RgbImage;

use crate::edit::{EditJob, EditOutput, EditSettings, EditText};
use crate::error::{PipelineError, Result};
use crate::pipeline::{Denoising, FluxPipeline, InitialNoise, Progress};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EarlyFilter {
    #[default]
    Continue,
    Restart,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    #[default]
    Tournament,
    Halving,
}

#[derive(Debug, Clone)]
pub struct SearchSettings {
    pub seeds: Vec<u64>,
    pub early_steps: usize,
    pub filter: EarlyFilter,
    pub selection: Selection,
    /// Candidates denoised together per transformer evaluation before they are judged (1: one
    /// at a time, bit for bit a plain edit of the winner's seed).
    pub batch: usize,
}

/// Transformer evaluations a search costs, by the formulas above (tournament selection).
pub fn search_cost(
    filter: EarlyFilter,
    candidates: usize,
    early_steps: usize,
    steps: usize,
) -> usize {
    match filter {
        EarlyFilter::Continue => steps + candidates.saturating_sub(1) * early_steps,
        EarlyFilter::Restart => candidates * early_steps + steps,
    }
}

/// One candidate: its previews as the search saw them, and how far it went.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub seed: u64,
    /// (steps taken, right half of the clean-image estimate).
    pub previews: Vec<(usize, RgbImage)>,
    pub evaluations: usize,
    /// Of those, the ones computed in full (fewer with a step cache).
    pub full_evaluations: usize,
}

/// One judge call.
#[derive(Debug, Clone)]
pub struct JudgeCall {
    pub first_seed: u64,
    pub second_seed: u64,
    pub winner_seed: u64,
    /// Steps of the previews compared.
    pub at_step: usize,
    pub judge: String,
    pub answer: String,
    pub latency: Duration,
    pub warnings: Vec<String>,
}

pub struct SearchOutcome {
    pub winner_seed: u64,
    pub result: EditOutput,
    pub candidates: Vec<Candidate>,
    pub calls: Vec<JudgeCall>,
    /// Transformer evaluations, all candidates and the finish included.
    pub evaluations: usize,
    /// Of those, the ones computed in full (fewer with a step cache).
    pub full_evaluations: usize,
}

impl FluxPipeline {
    /// Best-of-N edit: see the module docs. The judge sees the job's original (the diptych's
    /// source half, or Kontext's photo) and the edited part of each preview.
    #[allow(clippy::too_many_arguments)]
    pub fn edit_search(
        &mut self,
        job: &EditJob,
        text: &EditText,
        instruction: &str,
        settings: &EditSettings,
        search: &SearchSettings,
        judge: &mut dyn Judge,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<SearchOutcome> {
        self.edit_search_until(
            job,
            text,
            instruction,
            settings,
            search,
            judge,
            progress,
            &|| None,
        )
    }

    /// [`FluxPipeline::edit_search`], asking `stop` before every step and judge call (a
    /// server's cancel or time limit): `Some(reason)` ends the search with
    /// [`PipelineError::Stopped`].
    #[allow(clippy::too_many_arguments)]
    pub fn edit_search_until(
        &mut self,
        job: &EditJob,
        text: &EditText,
        instruction: &str,
        settings: &EditSettings,
        search: &SearchSettings,
        judge: &mut dyn Judge,
        progress: &mut dyn FnMut(Progress),
        stop: &dyn Fn() -> Option<&'static str>,
    ) -> Result<SearchOutcome> {
        search.validate(settings)?;
        let original = job.original();
        let start =
            |this: &mut Self, seed: u64, steps: usize, progress: &mut dyn FnMut(Progress)| {
                let settings = EditSettings {
                    steps,
                    ..settings.clone()
                };
                this.start_edit(job, text, &settings, InitialNoise::Seed(seed), progress)
            };
        let mut candidates: Vec<Candidate> = search
            .seeds
            .iter()
            .map(|&seed| Candidate {
                seed,
                previews: Vec::new(),
                evaluations: 0,
                full_evaluations: 0,
            })
            .collect();
        let mut calls = Vec::new();
        let mut judge_pair = |candidates: &[Candidate],
                              a: usize,
                              b: usize,
                              calls: &mut Vec<JudgeCall>|
         -> Result<usize> {
            if let Some(reason) = stop() {
                return Err(PipelineError::Stopped(reason));
            }
            let (step, first) = candidates[a].previews.last().expect("previewed");
            let (_, second) = candidates[b].previews.last().expect("previewed");
            let verdict = judge
                .compare(&Comparison {
                    instruction,
                    first,
                    second,
                    original: &original,
                })
                .map_err(|e| PipelineError::Input(e.to_string()))?;
            let winner = match verdict.preference {
                Preference::First => a,
                Preference::Second => b,
            };
            calls.push(JudgeCall {
                first_seed: candidates[a].seed,
                second_seed: candidates[b].seed,
                winner_seed: candidates[winner].seed,
                at_step: *step,
                judge: verdict.judge,
                answer: verdict.answer,
                latency: verdict.latency,
                warnings: verdict.warnings,
            });
            Ok(winner)
        };

        let (winner, result) = match search.filter {
            EarlyFilter::Restart => {
                let mut shorts = Vec::with_capacity(candidates.len());
                for c in &candidates {
                    shorts.push(start(self, c.seed, search.early_steps, progress)?);
                }
                self.advance_batch_until(
                    shorts.iter_mut().collect(),
                    usize::MAX,
                    search.batch,
                    progress,
                    stop,
                )?;
                for (c, short) in candidates.iter_mut().zip(&shorts) {
                    let preview = job.judged(&self.decode(short)?);
                    c.previews.push((search.early_steps, preview));
                    c.evaluations += short.evaluations();
                    c.full_evaluations += short.full_evaluations();
                }
                let winner = tournament(&candidates, &mut calls, &mut judge_pair)?;
                let mut run = start(self, candidates[winner].seed, settings.steps, progress)?;
                self.advance_batch_until(vec![&mut run], usize::MAX, 1, progress, stop)?;
                candidates[winner].evaluations += run.evaluations();
                candidates[winner].full_evaluations += run.full_evaluations();
                (winner, self.finish(job, &run)?)
            }
            EarlyFilter::Continue => {
                let mut states: Vec<Denoising> = Vec::with_capacity(candidates.len());
                for c in &candidates {
                    states.push(start(self, c.seed, settings.steps, progress)?);
                }
                // Previews where a run stands (advanced there beforehand, in batches).
                let preview_at = |this: &mut Self,
                                  states: &[Denoising],
                                  candidates: &mut [Candidate],
                                  i: usize|
                 -> Result<()> {
                    let preview = job.judged(&this.preview(&states[i])?);
                    candidates[i].previews.push((states[i].step(), preview));
                    Ok(())
                };
                let winner = match search.selection {
                    Selection::Tournament => {
                        let all = states.iter_mut().collect();
                        let until = search.early_steps;
                        self.advance_batch_until(all, until, search.batch, progress, stop)?;
                        for i in 0..candidates.len() {
                            preview_at(self, &states, &mut candidates, i)?;
                        }
                        tournament(&candidates, &mut calls, &mut judge_pair)?
                    }
                    Selection::Halving => {
                        let mut alive: Vec<usize> = (0..candidates.len()).collect();
                        let mut steps = search.early_steps;
                        while alive.len() > 1 {
                            let group = states
                                .iter_mut()
                                .enumerate()
                                .filter(|(i, _)| alive.contains(i))
                                .map(|(_, s)| s)
                                .collect();
                            self.advance_batch_until(group, steps, search.batch, progress, stop)?;
                            for &i in &alive {
                                preview_at(self, &states, &mut candidates, i)?;
                            }
                            let mut next = Vec::with_capacity(alive.len().div_ceil(2));
                            for pair in alive.chunks(2) {
                                next.push(match *pair {
                                    [a, b] => judge_pair(&candidates, a, b, &mut calls)?,
                                    [a] => a,
                                    _ => unreachable!("chunks of two"),
                                });
                            }
                            alive = next;
                            steps = (steps * 2).min(settings.steps);
                        }
                        alive[0]
                    }
                };
                let state = &mut states[winner];
                self.advance_batch_until(vec![state], usize::MAX, 1, progress, stop)?;
                for (c, s) in candidates.iter_mut().zip(&states) {
                    c.evaluations = s.evaluations();
                    c.full_evaluations = s.full_evaluations();
                }
                (winner, self.finish(job, &states[winner])?)
            }
        };
        progress(Progress::Decoding);
        Ok(SearchOutcome {
            winner_seed: candidates[winner].seed,
            result,
            evaluations: candidates.iter().map(|c| c.evaluations).sum(),
            full_evaluations: candidates.iter().map(|c| c.full_evaluations).sum(),
            candidates,
            calls,
        })
    }
}

type PairJudge<'a> =
    dyn FnMut(&[Candidate], usize, usize, &mut Vec<JudgeCall>) -> Result<usize> + 'a;

/// The paper's running best: the best so far against each next candidate (N - 1 calls).
fn tournament(
    candidates: &[Candidate],
    calls: &mut Vec<JudgeCall>,
    judge: &mut PairJudge,
) -> Result<usize> {
    let mut best = 0;
    for challenger in 1..candidates.len() {
        best = judge(candidates, best, challenger, calls)?;
    }
    Ok(best)
}

/// Most candidates one search runs: each keeps its denoising state and previews in memory.
pub const MAX_CANDIDATES: usize = 64;

impl SearchSettings {
    /// Whether the search can run with these edit settings (checked before any work).
    pub fn validate(&self, settings: &EditSettings) -> Result<()> {
        let bad = |m: String| Err(PipelineError::Input(m));
        if self.seeds.len() < 2 {
            return bad("a seed search needs at least 2 candidate seeds".into());
        }
        if self.seeds.len() > MAX_CANDIDATES {
            return bad(format!(
                "a seed search takes at most {MAX_CANDIDATES} candidate seeds, got {}",
                self.seeds.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = self.seeds.iter().find(|s| !seen.insert(**s)) {
            return bad(format!("seed {dup} is listed twice"));
        }
        if self.early_steps == 0 || self.early_steps >= settings.steps {
            return bad(format!(
                "--early-steps must be between 1 and the step count minus one ({}), got {}",
                settings.steps.saturating_sub(1),
                self.early_steps
            ));
        }
        if self.batch == 0 {
            return bad("--batch-candidates must be at least 1".into());
        }
        if self.filter == EarlyFilter::Restart && self.selection == Selection::Halving {
            let why = "successive halving grows each candidate's run";
            return bad(format!("{why}, so it needs --early-filter continue"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_follow_the_formulas() {
        assert_eq!(search_cost(EarlyFilter::Continue, 6, 10, 28), 28 + 5 * 10);
        assert_eq!(search_cost(EarlyFilter::Restart, 6, 10, 50), 50 + 6 * 10);
        assert_eq!(search_cost(EarlyFilter::Continue, 1, 10, 28), 28);
    }
}
