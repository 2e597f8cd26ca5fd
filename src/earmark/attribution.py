"""Attribution of a sample or an incident: evidence, hypotheses, case document."""
