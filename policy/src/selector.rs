//! Label selectors as NetworkPolicy uses them: `matchLabels` and
//! `matchExpressions` (In, NotIn, Exists, DoesNotExist), all of which must
//! hold. The empty selector selects everything.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A pod's or namespace's labels.
pub type Labels = BTreeMap<String, String>;

/// One `matchExpressions` term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// The label is present with one of these values.
    In(String, Vec<String>),
    /// The label is absent, or present with none of these values.
    NotIn(String, Vec<String>),
    /// The label is present.
    Exists(String),
    /// The label is absent.
    DoesNotExist(String),
}

impl Requirement {
    fn holds(&self, labels: &Labels) -> bool {
        match self {
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
        }
    }
}

/// A parsed label selector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// A `matchExpressions` term the API should not have let through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("matchExpressions: {0}")]
pub struct SelectorError(String);

impl Selector {
    /// The selector that selects everything (`{}`).
    pub fn everything() -> Self {
        Self::default()
    }

    /// Reads an API label selector. `matchLabels` entries become `In` with
    /// one value.
    pub fn parse(selector: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements: Vec<Requirement> = selector
            .match_labels
            .iter()
            .flatten()
            .map(|(key, value)| Requirement::In(key.clone(), vec![value.clone()]))
            .collect();
        for expression in selector.match_expressions.iter().flatten() {
            let key = expression.key.clone();
            let values = expression.values.clone().unwrap_or_default();
            let requirement = match expression.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(SelectorError(format!(
                        "{key} {} needs at least one value",
                        expression.operator
                    )))
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    return Err(SelectorError(format!(
                        "{key} has operator {other:?}; use In, NotIn, Exists or DoesNotExist"
                    )))
                }
            };
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.holds(labels))
    }

    /// Builds a selector from its requirements (for tests and generators).
    pub fn of(requirements: Vec<Requirement>) -> Self {
        Self { requirements }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn the_empty_selector_selects_everything() {
        let selector = Selector::parse(&LabelSelector::default()).unwrap();
        assert!(selector.matches(&Labels::new()));
        assert!(selector.matches(&labels(&[("app", "web")])));
    }

    #[test]
    fn match_labels_and_expressions_must_all_hold() {
        let selector = Selector::parse(&LabelSelector {
            match_labels: Some(BTreeMap::from([("app".into(), "web".into())])),
            match_expressions: Some(vec![
                expression("tier", "In", &["front", "edge"]),
                expression("env", "NotIn", &["prod"]),
                expression("team", "Exists", &[]),
                expression("legacy", "DoesNotExist", &[]),
            ]),
        })
        .unwrap();
        let good = [("app", "web"), ("tier", "edge"), ("team", "a")];
        assert!(selector.matches(&labels(&good)));
        assert!(selector.matches(&labels(&[good[0], good[1], good[2], ("env", "dev")])));
        assert!(!selector.matches(&labels(&[good[0], good[1], good[2], ("env", "prod")])));
        assert!(!selector.matches(&labels(&[good[0], good[1], good[2], ("legacy", "")])));
        assert!(!selector.matches(&labels(&[good[0], good[1]])));
        assert!(!selector.matches(&labels(&[good[0], ("tier", "back"), good[2]])));
        assert!(!selector.matches(&labels(&[("app", "db"), good[1], good[2]])));
    }

    #[test]
    fn bad_expressions_are_refused_with_the_fix() {
        for (operator, values, says) in [
            ("Matches", vec!["x"], "use In, NotIn"),
            ("In", vec![], "needs at least one value"),
        ] {
            let error = Selector::parse(&LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![expression("app", operator, &values)]),
            })
            .unwrap_err();
            assert!(error.to_string().contains(says), "{error}");
        }
    }
}
