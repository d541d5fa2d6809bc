-- A merge re-points the conversations already merged into the one it folds
-- (UPDATE ... WHERE merged_into = $1): without an index that read every conversation of the
-- schema (16 ms at 50,000 conversations, growing with them). Few rows are ever merged.
CREATE INDEX conversations_merged_into ON conversations (merged_into) WHERE merged_into IS NOT NULL;
