"""The data that ships with qloc: ParaRel (facts and paraphrased queries) and the WikiText-2 test
split, gzipped beside this file (origins and licenses in NOTICE.md)."""
