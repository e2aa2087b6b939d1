//! Who may write where: rights per broker user (`rights`). The identity is the AMQP
//! `user_id` property, which RabbitMQ refuses unless it matches the connection's user.

pub mod rights;
