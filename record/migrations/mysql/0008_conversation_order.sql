-- 'p:{a}:{b}' in the new order (see migration 5).
UPDATE conversation
SET conv_id = CONCAT('p:',
    LEAST(SUBSTRING_INDEX(SUBSTRING(conv_id, 3), ':', 1), SUBSTRING_INDEX(conv_id, ':', -1)),
    ':',
    GREATEST(SUBSTRING_INDEX(SUBSTRING(conv_id, 3), ':', 1), SUBSTRING_INDEX(conv_id, ':', -1)))
WHERE conv_id LIKE 'p:%';
