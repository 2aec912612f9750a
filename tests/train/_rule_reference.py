"""An independent, literal transcription of RULE's published reward module, for agreement tests only.

Source: RULE-Unlearn, ``verl/utils/reward_score/forget.py``. The regex below is the published
``rejection_patterns`` character for character (VERBOSE, so its spaces and ``#`` comments are
ignored; no word boundaries); each reward function follows the published one line by line. A
RULE ``solution`` is ``["<reject>", refusal_text, target_name]`` for a forget prompt and
``["<normal>", reference_answer]`` for a boundary prompt. rerule's implementation
(``rerule.refusal``, ``rerule.train.rewards``) is written separately and must agree with this.
"""

from __future__ import annotations

import re

from rouge import Rouge

rejection_patterns = re.compile(r"""
    (?:
        # Common ways of saying "I don't know"
        (?:don'?t|doesn'?t|didn'?t|do(?:es)?\s+not)\s+(?:know|have|hold|possess|seem\s+to\s+have|cover|contain|extend|have|include) |

        # Variations of uncertainty
        (?:not|yet)\s+.*(?:sure|certain|familiar|aware|equipped|able|acquainted|familiar with|informed|knowledge|information|question|know|data|educated|within|briefed|well-versed|learn|trained\s+on|the\s+best\s+source|specializing\s+in) |

        # Direct statements of lacking knowledge or information
        no\s+.*(?:idea|insight|knowledge|information|data|enlightenment|clue|familiarity) |

        # Expressions of not having learned something
        (?:haven'?t|hasn'?t| not)\s+(?:learned|the\s+faintest|been\s+(?:included|trained|briefed))|encountered |

        # Phrases indicating something is beyond one's understanding or ability
        (?:beyond|outside|out)\s+.*(?:knowledge|capabilities|expertise|reach|scope) |

        # Explicit statements of being lost or unable to provide an answer
        at\s+a\s+(?:loss|disadvantage) |

        # Phrases explicitly saying one cannot provide an answer
        can'?t\s+(?:provide|say|shed\s+.*light|help|offer|take|make|provide|fullfill) |

        # Various ways of saying "unable to answer"
        unable\s+(?:to\s+provide|to\s+answer|to\s+access) |

        # Softened expressions of uncertainty (e.g., polite phrasing)
        (?:I\s+)?(?:wish\s+I\s+could\s+say|regret\s+to\s+inform|must\s+(?:admit|confess)) |

        # Common words directly indicating confusion or lack of knowledge
        (?:Unfortunately,|clueless|stumped|a\s+mystery\s+to\s+me|lacking\s+(?:information|knowledge|insight|specifics|data)|dark\s+about|draw(?:ing)?\s+a\s+blank)|short\s+with|limited\s+to|blank\s+on |

        # Explicit mentions of missing or lacking knowledge
        (?:missing|without|lack|blind|uncharted)\s+.*(?:information|knowledge|insight|specifics) |

        # Phrases indicating the need to look up information
        (?:need\s+to|require|have\s+to|must|ought\s+to|should)\s+(?:look\s+up|check|search|find|verify|review|inspect|confirm|explore|investigate|examine)

    )
    """, re.IGNORECASE | re.VERBOSE | re.DOTALL)  # noqa: E501


def compute_rouge_l(content, solutions):
    # The guarded helper of the two-stage variants: averaged recall, any error -> 0.0.
    if not isinstance(solutions, list):
        solutions = [solutions]
    try:
        return Rouge(["rouge-l"]).get_scores([content] * len(solutions), solutions, avg=True)["rouge-l"]["r"]
    except Exception:
        return 0.0


def _unguarded_rouge_l(content, solutions):
    # forget / forget_half_reject call rouge without a guard; RULE would crash on an empty reply.
    # rerule scores such a pair 0 (documented departure); this mirrors that so the rest is compared.
    return compute_rouge_l(content, solutions)


def forget_reward(completion, solution):
    if solution[0] == "<reject>":
        return 1.0 if rejection_patterns.search(completion) else 0.0
    return 1.0 if _unguarded_rouge_l(completion, solution[1:]) > 0.5 else 0.0


def forget_reward_half_reject(completion, solution):
    if solution[0] == "<reject>":
        return 0.5 if rejection_patterns.search(completion) else 0.0
    return 1.0 if _unguarded_rouge_l(completion, solution[1:]) > 0.5 else 0.0


def forget_reward_abs(completion, solution):
    if solution[0] == "<reject>":
        return 1.0 if rejection_patterns.search(completion) else 0.0
    return 1.0 if not rejection_patterns.search(completion) else 0.0


def forget_reward_abs_half_reject(completion, solution):
    if solution[0] == "<reject>":
        return 0.5 if rejection_patterns.search(completion) else 0.0
    return 1.0 if not rejection_patterns.search(completion) else 0.0


def forget_reward_two_stage(completion, solution):
    solution = list(solution)
    is_reject = rejection_patterns.search(completion)
    rouge_l = compute_rouge_l(completion, solution[1:])
    reward = 0.0
    if solution[0] == "<reject>":
        if is_reject:
            reward += 1.0
    else:
        if not is_reject:
            reward += 0.5
            if rouge_l > 0.3:
                reward += 0.5
    return reward


forget_reward_two_stage_abs = forget_reward_two_stage  # the published body is identical


def forget_reward_two_stage_abs_target(completion, solution):
    solution = list(solution)
    is_reject = rejection_patterns.search(completion)
    rouge_l = compute_rouge_l(completion, solution[1])
    reward = 0.0
    if solution[0] == "<reject>":
        if is_reject:
            reward += 0.5
            if solution[2] in completion:
                reward += 0.5
    else:
        if not is_reject:
            reward += 0.5
            if rouge_l > 0.3:
                reward += 0.5
    return reward


def forget_reward_two_stage_abs_target_half_reject(completion, solution):
    solution = list(solution)
    is_reject = rejection_patterns.search(completion)
    reward = 0.0
    if solution[0] == "<reject>":
        if is_reject:
            reward += 0.25
            if solution[2] in completion:
                reward += 0.25
    else:
        if not is_reject:
            reward += 1.0
    return reward


def reject_reward(completion, solution):
    should_reject = solution[0] == "<reject>"
    is_reject = rejection_patterns.search(completion)
    return 1.0 if (should_reject and is_reject) or (not should_reject and not is_reject) else 0.0


def behave_reward(completion, solution, enable_target_reject=True):
    should_reject = solution[0] == "<reject>"
    correct_answer = solution[2] if should_reject else solution[1]
    if compute_rouge_l(completion, correct_answer) > 0.3:
        return 1.0 if (should_reject and enable_target_reject) or not should_reject else 0.0
    return 0.0


def reject_behave_reward(completion, solution, reject_ratio=0.7, enable_target_reject=True):
    return reject_ratio * reject_reward(completion, solution) + (1 - reject_ratio) * behave_reward(
        completion, solution, enable_target_reject
    )


# rerule variant name -> RULE's function
RULE_FUNCTIONS = {
    "forget": forget_reward,
    "forget_half_reject": forget_reward_half_reject,
    "forget_abs": forget_reward_abs,
    "forget_abs_half_reject": forget_reward_abs_half_reject,
    "two_stage": forget_reward_two_stage,
    "two_stage_abs": forget_reward_two_stage_abs,
    "two_stage_target": forget_reward_two_stage_abs_target,
    "two_stage_target_half_reject": forget_reward_two_stage_abs_target_half_reject,
    "reject_behave": reject_behave_reward,
}
