//! The stores' schema migrations, built in (no files to ship).

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};

/// A migrator for `migrations`, each (version, description, SQL). With
/// `shared` the database holds another store's migrations too (the MySQL
/// message and group stores share one), which it leaves alone.
pub fn migrator(migrations: &[(i64, &'static str, &'static str)], shared: bool) -> Migrator {
    Migrator {
        migrations: Cow::Owned(
            migrations
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect(),
        ),
        ignore_missing: shared,
        ..Migrator::DEFAULT
    }
}
