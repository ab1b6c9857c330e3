"""Answer decision: rules, the semantic route, the answerability check and the one decider over them."""
