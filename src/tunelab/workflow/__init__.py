"""Stages chained through run folders: a fine-tune with its evaluations today; multi-stage
training, distillation and the autopilot next. Sits above train and evaluate, which never
import each other."""
