//! The step graph: each step's prerequisites from its **Dependencies** line (or the step
//! before it), ancestors, and dependency cycles reported once.

use super::cx::Cx;
use crate::source::SourceTrace;
use std::collections::{BTreeMap, BTreeSet, HashMap};

impl Cx {
    /// Reports each dependency cycle once, at the line of its lowest-numbered step.
    pub(crate) fn report_cycles(
        &mut self,
        graph: &BTreeMap<u32, Vec<u32>>,
        numbers: &HashMap<u32, usize>,
    ) {
        // 0 = unvisited, 1 = on the stack, 2 = done.
        let mut state: BTreeMap<u32, u8> = BTreeMap::new();
        let mut reported: BTreeSet<Vec<u32>> = BTreeSet::new();
        for &start in graph.keys() {
            let mut stack: Vec<(u32, usize)> = vec![(start, 0)];
            let mut path: Vec<u32> = Vec::new();
            while let Some((node, i)) = stack.pop() {
                if i == 0 {
                    if state.get(&node).copied().unwrap_or(0) != 0 {
                        continue;
                    }
                    state.insert(node, 1);
                    path.push(node);
                }
                let next = graph.get(&node).and_then(|d| d.get(i)).copied();
                match next {
                    Some(n) => {
                        stack.push((node, i + 1));
                        match state.get(&n).copied().unwrap_or(0) {
                            0 if graph.contains_key(&n) => stack.push((n, 0)),
                            1 => {
                                let from = path.iter().position(|&p| p == n).unwrap_or(0);
                                let mut cycle: Vec<u32> = path[from..].to_vec();
                                let lowest = cycle
                                    .iter()
                                    .enumerate()
                                    .min_by_key(|(_, v)| **v)
                                    .map_or(0, |(i, _)| i);
                                cycle.rotate_left(lowest);
                                if reported.insert(cycle.clone()) {
                                    let shown: Vec<String> = cycle
                                        .iter()
                                        .chain(cycle.first())
                                        .map(|n| format!("step {n}"))
                                        .collect();
                                    let line = numbers.get(&cycle[0]).copied().unwrap_or(1);
                                    self.error(
                                        line,
                                        format!(
                                            "dependency cycle: {} (each waits for the next)",
                                            shown.join(" → ")
                                        ),
                                    );
                                }
                            }
                            _ => {}
                        }
                    }
                    None => {
                        state.insert(node, 2);
                        path.pop();
                    }
                }
            }
        }
    }
}

/// Each step's prerequisites: its parsed **Dependencies** (when the line parses), else the
/// step before it in source order.
pub(crate) fn step_graph(src: &SourceTrace) -> BTreeMap<u32, Vec<u32>> {
    let mut prev = None;
    let mut g = BTreeMap::new();
    for s in &src.steps {
        let deps = match &s.dependencies {
            Some((text, _)) => parse_dependencies(text)
                .map(|d| d.into_iter().map(|(n, _)| n).collect())
                .unwrap_or_default(),
            None => prev.into_iter().collect(),
        };
        g.entry(s.number).or_insert(deps);
        prev = Some(s.number);
    }
    g
}

/// Every step that must finish before `step` runs.
pub(crate) fn ancestors(graph: &BTreeMap<u32, Vec<u32>>, step: u32) -> BTreeSet<u32> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<u32> = graph.get(&step).cloned().unwrap_or_default();
    while let Some(n) = todo.pop() {
        if n != step && seen.insert(n) {
            todo.extend(graph.get(&n).into_iter().flatten().copied());
        }
    }
    seen
}

/// Parses `None` or `Step N (output_variable: name), Step M`.
pub(crate) fn parse_dependencies(text: &str) -> Result<Vec<(u32, Option<String>)>, String> {
    let t = text.trim();
    // LLMunix writes `None`, `None (first step)`, `None (can run in parallel with Step 1)`.
    let none = t.get(..4).is_some_and(|h| h.eq_ignore_ascii_case("none"))
        && t[4..].trim_start().chars().next().is_none_or(|c| c == '(');
    if t.is_empty() || none || t == "-" {
        return Ok(Vec::new());
    }
    let re = regex::Regex::new(
        r"^\s*[Ss]tep\s+(\d+)\s*(?:\(\s*output_variable\s*:\s*`?([^)`\s]+)`?\s*\))?\s*$",
    )
    .map_err(|e| e.to_string())?;
    t.split(',')
        .map(|part| {
            let c = re.captures(part).ok_or_else(|| part.trim().to_owned())?;
            let n = c[1].parse::<u32>().map_err(|_| part.trim().to_owned())?;
            Ok((n, c.get(2).map(|m| m.as_str().to_owned())))
        })
        .collect()
}
