"""Command line: `python -m flowmatch {fit,validate,test,predict,sample}`."""
