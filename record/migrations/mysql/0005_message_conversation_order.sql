-- One-to-one conversation ids in the new canonical order, the byte-wise
-- smaller id first ('p:2:10' becomes 'p:10:2'); group messages keep their
-- group in conv_id and have an empty receiver. (MySQL assigns left to right:
-- conv_id is computed from the receiver before it is cleared.) No new id
-- can meet an old one: old ids put the numerically smaller first.
UPDATE message
SET conv_id = IF(conv_id LIKE 'p:%',
                 CONCAT('p:', LEAST(sender, receiver), ':', GREATEST(sender, receiver)),
                 conv_id),
    receiver = IF(conv_id LIKE 'g:%', '', receiver);
